package org.nativemem.engine;

import org.nativemem.EngineLibrary;
import org.nativemem.NativeMemoryManager;

/**
 * A small native engine written in C against {@code include/nativemem.h} only (tests/c/engine.c,
 * built by Gradle's {@code cEngineBuild} into its own {@code libnm_test_engine.so}). It never
 * links libnativemem_jni: it gets the address of the {@code nm_api} table
 * ({@link NativeMemoryManager#nativeApi()}) and a manager handle ({@link NativeMemoryManager#handle()})
 * and reaches the manager only through the table. Used by the JUnit test
 * ({@code tests/java/org/nativemem/engine/CEngineTest}) and the Spark job
 * ({@code org.nativemem.e2e.CEngineJob}); the source lives once, in tests/support/java.
 *
 * <h2>What one engine holds</h2>
 * A pool handle, spillable buffers ({@code api->allocate}, 64-byte aligned, written), a spillable
 * "index" reservation, a registered spiller (frees buffers and shrinks the index, re-entering the
 * table from inside the spill) and itself as attached state, so the manager's close runs its drop,
 * which frees what is left through the table. Every native method takes a lease for its own
 * span only (a lease kept across calls would block the manager's close; see engine.c).
 *
 * <h2>Loading</h2>
 * The library is a classpath resource
 * ({@code org/nativemem/engine/native/<os>-<arch>/libnm_test_engine.so}, in the test resources and
 * in nativemem-e2e.jar), loaded with {@link EngineLibrary} as any engine would load its own, so it
 * works in a local-cluster executor as in the test JVM.
 *
 * <p>Not thread-safe for {@link #close()} against other calls on the same instance (an engine's
 * native calls themselves are).
 */
public final class CEngine implements AutoCloseable {
    /** The library, loaded the way an engine loads its own: {@link EngineLibrary}. */
    private static final EngineLibrary LIBRARY = new EngineLibrary(CEngine.class, "nm_test_engine",
            "org/nativemem/engine/native", "nativemem.test.engine.path");

    /** {@code nm_status} values of nativemem.h. */
    public static final int NM_OK = 0;
    public static final int NM_ERR_INVALID_ARGUMENT = 1;
    public static final int NM_ERR_STALE_HANDLE = 2;
    public static final int NM_ERR_INVALID_HANDLE = 3;
    public static final int NM_ERR_CLOSED = 4;
    public static final int NM_ERR_OUT_OF_MEMORY = 5;
    public static final int NM_ERR_UNKNOWN_POINTER = 6;
    public static final int NM_ERR_LISTENER = 7;
    public static final int NM_ERR_SPILL = 8;
    public static final int NM_ERR_UNSUPPORTED = 9;
    public static final int NM_ERR_TIMEOUT = 10;
    public static final int NM_ERR_INTERNAL = 11;

    static {
        load();
    }

    private long ptr;
    private final String poolPath;

    private CEngine(long ptr, String poolPath) {
        this.ptr = ptr;
        this.poolPath = poolPath;
    }

    private static void load() {
        LIBRARY.load();
    }

    /**
     * Opens an engine on {@code manager}'s pool {@code poolPath}.
     *
     * @param poolLimit limit of the pool when it is created, or -1 for none
     * @throws CEngineException with the ABI's status if a step fails
     */
    public static CEngine open(NativeMemoryManager manager, String poolPath, long poolLimit) {
        return open(NativeMemoryManager.nativeApi(), manager.handle(), poolPath, poolLimit);
    }

    /** Opens an engine from the two integers Java hands to an engine. */
    public static CEngine open(long apiAddress, long managerHandle, String poolPath, long poolLimit) {
        return new CEngine(nativeOpen(apiAddress, managerHandle, poolPath, poolLimit), poolPath);
    }

    /** @return the pool path this engine opened */
    public String poolPath() {
        return poolPath;
    }

    /** The engine struct's address (for the C misuse probes of the test). */
    public long address() {
        return live();
    }

    private long live() {
        if (ptr == 0) {
            throw new IllegalStateException("CEngine is closed");
        }
        return ptr;
    }

    /**
     * Allocates {@code count} spillable buffers of {@code size} bytes, then grows the spillable
     * index reservation by {@code indexBytes}.
     *
     * @return {buffers, bytes}
     */
    public long[] allocate(int count, long size, long indexBytes) {
        return nativeAllocate(live(), count, size, indexBytes);
    }

    /** Frees up to {@code count} buffers (newest first); returns the bytes freed. */
    public long freeBuffers(int count) {
        return nativeFreeBuffers(live(), count);
    }

    /** Result of {@link #growShrink}. */
    public static final class GrowShrink {
        public final long sizeAtPeak;
        public final long poolUsedAtPeak;
        public final long managerUsedAtPeak;
        public final long managerReservedAtPeak;
        public final long poolUsedAfter;
        public final long managerUsedAfter;
        public final long managerReservedAfter;

        GrowShrink(long[] v) {
            sizeAtPeak = v[0];
            poolUsedAtPeak = v[1];
            managerUsedAtPeak = v[2];
            managerReservedAtPeak = v[3];
            poolUsedAfter = v[4];
            managerUsedAfter = v[5];
            managerReservedAfter = v[6];
        }

        @Override
        public String toString() {
            return "GrowShrink{sizeAtPeak=" + sizeAtPeak + ", poolUsedAtPeak=" + poolUsedAtPeak + ", managerUsedAtPeak="
                    + managerUsedAtPeak + ", managerReservedAtPeak=" + managerReservedAtPeak + ", poolUsedAfter="
                    + poolUsedAfter + ", managerUsedAfter=" + managerUsedAfter + ", managerReservedAfter="
                    + managerReservedAfter + "}";
        }
    }

    /**
     * Grows a new reservation to {@code bytes} in {@code steps} equal steps, reads the stats at the
     * peak, shrinks it back in as many steps and closes it.
     */
    public GrowShrink growShrink(long bytes, int steps) {
        return new GrowShrink(nativeGrowShrink(live(), bytes, steps));
    }

    /** Leaks on purpose: an allocation it forgets and a reservation it never closes. */
    public void leak(long allocBytes, long reservationBytes) {
        nativeLeak(live(), allocBytes, reservationBytes);
    }

    /**
     * Misbehaviour of the spill callback: claim {@code overReport} more bytes than it freed, and/or
     * fail with {@code failStatus} (0: succeed).
     */
    public void setSpillBehaviour(long overReport, int failStatus) {
        nativeSetSpillBehaviour(live(), overReport, failStatus);
    }

    /** Counters of the engine and, while its manager is open, of its pool and manager. */
    public static final class Stats {
        /** Status of the lease taken to read the pool and manager (0, or the manager is gone). */
        public final long leaseStatus;
        public final long poolUsed;
        public final long poolPeak;
        public final long poolLimit;
        public final long managerUsed;
        public final long managerPeak;
        public final long managerReserved;
        public final long managerSpillCount;
        public final long managerSpilledBytes;
        /** Spill callbacks called / that freed something / bytes they really released. */
        public final long spillCalls;
        public final long spills;
        public final long spilledBytes;
        public final long spillErrors;
        public final long buffers;
        public final long bufferBytes;
        public final long indexBytes;
        public final long spillerDropped;
        public final long stateDropped;
        public final long dropFreedBytes;
        public final long dropFreedBuffers;
        public final long dropErrors;
        public final long leakedAllocBytes;
        public final long leakedReservationBytes;
        public final long refs;
        public final long managerHandle;
        public final long poolHandle;

        Stats(long[] v) {
            leaseStatus = v[0];
            poolUsed = v[1];
            poolPeak = v[2];
            poolLimit = v[3];
            managerUsed = v[4];
            managerPeak = v[5];
            managerReserved = v[6];
            managerSpillCount = v[7];
            managerSpilledBytes = v[8];
            spillCalls = v[9];
            spills = v[10];
            spilledBytes = v[11];
            spillErrors = v[12];
            buffers = v[13];
            bufferBytes = v[14];
            indexBytes = v[15];
            spillerDropped = v[16];
            stateDropped = v[17];
            dropFreedBytes = v[18];
            dropFreedBuffers = v[19];
            dropErrors = v[20];
            leakedAllocBytes = v[21];
            leakedReservationBytes = v[22];
            refs = v[23];
            managerHandle = v[24];
            poolHandle = v[25];
        }

        /** Bytes the engine holds as spillable memory (buffers + index). */
        public long heldBytes() {
            return bufferBytes + indexBytes;
        }

        @Override
        public String toString() {
            return "CEngine.Stats{lease=" + leaseStatus + ", pool used/peak/limit=" + poolUsed + "/" + poolPeak + "/"
                    + poolLimit + ", manager used/peak/reserved=" + managerUsed + "/" + managerPeak + "/"
                    + managerReserved + ", manager spills=" + managerSpillCount + " (" + managerSpilledBytes
                    + " B), engine spill calls=" + spillCalls + " spills=" + spills + " (" + spilledBytes
                    + " B, errors " + spillErrors + "), buffers=" + buffers + " (" + bufferBytes + " B), index="
                    + indexBytes + ", spiller dropped=" + spillerDropped + ", state dropped=" + stateDropped
                    + " (freed " + dropFreedBytes + " B in " + dropFreedBuffers + " buffers, errors " + dropErrors
                    + "), leaked alloc=" + leakedAllocBytes + " reservation=" + leakedReservationBytes + ", refs="
                    + refs + "}";
        }
    }

    public Stats stats() {
        return new Stats(nativeStats(live()));
    }

    /** Grows and shrinks from {@code threads} pthreads; see engine.c. */
    public static final class ThreadsResult {
        public final long grows;
        public final long outOfMemory;
        public final long errors;
        public final long firstError;
        public final long buffers;

        ThreadsResult(long[] v) {
            grows = v[0];
            outOfMemory = v[1];
            errors = v[2];
            firstError = v[3];
            buffers = v[4];
        }

        @Override
        public String toString() {
            return "ThreadsResult{grows=" + grows + ", outOfMemory=" + outOfMemory + ", errors=" + errors
                    + ", firstError=" + firstError + ", buffers=" + buffers + "}";
        }
    }

    /**
     * Starts {@code threads} pthreads (threads the JVM never saw), each with a lease of its own,
     * that grow/shrink a reservation by {@code grow} bytes {@code iterations} times and every 4th
     * iteration allocate a spillable buffer of {@code alloc} bytes; joins them.
     */
    public ThreadsResult runThreads(int threads, int iterations, long grow, long alloc) {
        return new ThreadsResult(nativeRunThreads(live(), threads, iterations, grow, alloc));
    }

    /** A pthread holding a lease (and an allocation of its own) until {@link #release()}. */
    public final class LeaseHolder {
        private long h;

        LeaseHolder(long h) {
            this.h = h;
        }

        /**
         * Lets the thread go: it checks its memory, tries calls on the closing manager, releases the
         * lease (running a deferred close there) and ends. See engine.c for the fields.
         */
        public long[] release() {
            long[] r = nativeReleaseHolder(h);
            h = 0;
            return r;
        }
    }

    /** Starts a {@link LeaseHolder}; returns once it holds its lease and {@code bytes}. */
    public LeaseHolder holdLease(long bytes) {
        return new LeaseHolder(nativeHoldLease(live(), bytes));
    }

    /**
     * Ends the engine: if its manager is still open, unregisters the spiller, detaches the state
     * (running its drop) and closes the pool handle; then drops Java's reference to the struct.
     * Idempotent.
     */
    @Override
    public void close() {
        shutdown();
        dispose();
    }

    /**
     * The first half of {@link #close()}; the engine stays readable.
     *
     * @return the status of the lease taken for that (non-zero: the manager was closing or
     *     closed, its close drops the engine)
     */
    public int shutdown() {
        return ptr == 0 ? NM_OK : nativeShutdown(ptr);
    }

    /** Drops Java's reference; afterwards every method throws {@link IllegalStateException}. */
    public void dispose() {
        long p = ptr;
        ptr = 0;
        if (p != 0) {
            nativeDispose(p);
        }
    }

    /**
     * Process-wide counters of the library: {engines opened, engine structs freed, state drops,
     * spiller drops, spills, spilled bytes, bytes freed by state drops, failed calls in drops}.
     */
    public static long[] globalStats() {
        return nativeGlobalStats();
    }

    // ---- misuse probes at the C level (see engine.c for each entry) ---------------------------

    /** nm_api_check on the real table and doctored copies. */
    public static long[] apiCheck(long apiAddress) {
        return nativeApiCheck(apiAddress);
    }

    /** Forged, zero, wrong-kind handles and bad arguments against a live manager. */
    public static long[] forged(long apiAddress, long managerHandle) {
        return nativeForged(apiAddress, managerHandle);
    }

    /** A lease released twice. */
    public static long[] releaseTwice(long apiAddress, long managerHandle) {
        return nativeReleaseTwice(apiAddress, managerHandle);
    }

    /** Spiller vtables the ABI must refuse. */
    public static long[] vtableChecks(long apiAddress, long managerHandle) {
        return nativeVtableChecks(apiAddress, managerHandle);
    }

    /** free() of a malloc'd, an interior, a NULL and a twice-freed pointer. */
    public long[] foreignFree() {
        return nativeForeignFree(live());
    }

    /** An allocation of this engine's manager freed through {@code other}'s pool. */
    public long[] crossFree(CEngine other) {
        return nativeCrossFree(live(), other.live());
    }

    /** Every handle of the engine after its manager closed. */
    public long[] staleProbe() {
        return nativeStaleProbe(live());
    }

    /** The engine on a manager made with manager_create, closed with manager_close. */
    public static long[] embedded(long apiAddress, long block, int buffers, long bufferSize, long indexBytes,
            long leakAlloc, long leakReservation, String[] report) {
        return nativeEmbedded(apiAddress, block, buffers, bufferSize, indexBytes, leakAlloc, leakReservation, report);
    }

    // ---- natives (tests/c/engine.c) ------------------------------------------------------------

    /**
     * Untracked memory (tests/c/engine.c, "a malloc hook's batching"): mallocs {@code plainBytes}
     * that nativemem never sees, and {@code trackedBytes} in 1 MiB blocks through a hook that charges
     * the task's pool {@code c-engine/untracked} with {@code reservation_force_grow}, batched per MiB
     * (never asking Spark: over-commit). All written, so resident.
     *
     * @return the holder, for {@link #untrackedStats} and {@link #closeUntracked}
     */
    public static long openUntracked(NativeMemoryManager manager, long plainBytes, long trackedBytes) {
        return nativeUntrackedOpen(NativeMemoryManager.nativeApi(), manager.handle(), plainBytes, trackedBytes);
    }

    /** @return {plain bytes held, hooked bytes held, over-committed reported, forced calls, reservation size} */
    public static long[] untrackedStats(long holder) {
        return nativeUntrackedStats(holder);
    }

    /** Frees both (the hooked blocks through the hook). @return {released by forced shrinks, forced calls, size after} */
    public static long[] closeUntracked(long holder) {
        return nativeUntrackedClose(holder);
    }

    /**
     * {@code manager_cover_overcommit} (tests/c/engine.c): Spark reserves the task's over-commit
     * (what forced grows charged beyond the reserve) now, whatever the task limit.
     *
     * @return the bytes the listener granted (0: nothing over-committed, or a library without the call)
     */
    public static long coverOvercommit(NativeMemoryManager manager) {
        return coverOvercommit(manager.handle());
    }

    /** {@link #coverOvercommit(NativeMemoryManager)} by handle (also one of a closed manager). */
    public static long coverOvercommit(long managerHandle) {
        return nativeCoverOvercommit(NativeMemoryManager.nativeApi(), managerHandle);
    }

    private static native long nativeCoverOvercommit(long api, long manager);

    private static native long nativeUntrackedOpen(long api, long manager, long plainBytes, long trackedBytes);

    private static native long[] nativeUntrackedStats(long holder);

    private static native long[] nativeUntrackedClose(long holder);

    private static native long nativeOpen(long api, long manager, String poolPath, long poolLimit);

    private static native long[] nativeAllocate(long engine, int count, long size, long indexBytes);

    private static native long nativeFreeBuffers(long engine, int count);

    private static native long[] nativeGrowShrink(long engine, long bytes, int steps);

    private static native void nativeLeak(long engine, long allocBytes, long reservationBytes);

    private static native long[] nativeStats(long engine);

    private static native void nativeSetSpillBehaviour(long engine, long overReport, int failStatus);

    private static native int nativeShutdown(long engine);

    private static native void nativeDispose(long engine);

    private static native long[] nativeGlobalStats();

    private static native long[] nativeRunThreads(long engine, int threads, int iterations, long grow, long alloc);

    private static native long nativeHoldLease(long engine, long bytes);

    private static native long[] nativeReleaseHolder(long holder);

    private static native long[] nativeApiCheck(long api);

    private static native long[] nativeForged(long api, long manager);

    private static native long[] nativeReleaseTwice(long api, long manager);

    private static native long[] nativeVtableChecks(long api, long manager);

    private static native long[] nativeForeignFree(long engine);

    private static native long[] nativeCrossFree(long engine, long other);

    private static native long[] nativeStaleProbe(long engine);

    private static native long[] nativeEmbedded(long api, long block, int buffers, long bufferSize, long indexBytes,
            long leakAlloc, long leakReservation, String[] report);
}
