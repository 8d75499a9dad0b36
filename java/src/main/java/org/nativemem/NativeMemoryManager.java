package org.nativemem;

import java.util.Objects;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * The native memory manager of one task attempt: a tree of pools with limits, native consumers
 * that can spill, allocations it tracks, and a cushion of bytes reserved from a Java
 * {@link ReservationListener} (in Spark, a {@code MemoryConsumer} of the task).
 *
 * <pre>{@code
 * try (NativeMemoryManager mm = NativeMemoryManager.create("stage-3 task-17", listener)) {
 *     long h = mm.handle();                  // give to native operators of this process
 *     try (NativeReservation buffers = mm.newReservation("arrow/buffers", 64L << 20)) {
 *         ...                                // JVM off-heap buffers charged to the same budget
 *     }
 * }                                          // frees everything, gives every byte back
 * }</pre>
 *
 * <h2>Memory flow</h2>
 * Native code (and {@link NativeReservation}s) take bytes from pools; the pools take them from the
 * reserved cushion; only when the cushion is empty does the manager call
 * {@link ReservationListener#reserve(long)}, for whole blocks of
 * {@link NativeMemoryConfig#reservationBlockSize()} bytes. When the listener grants too little,
 * native spillers are asked to free memory; if it is still not enough the request fails with
 * {@link NativeOutOfMemoryException}. In the other direction, {@link #reclaim(long)} gives
 * memory back to the listener's owner on request.
 *
 * <h2>Threads</h2>
 * All methods are thread-safe and may be called from any thread, concurrently. The native side
 * holds no lock while it calls the listener or a native spiller.
 *
 * <h2>Lifecycle and errors</h2>
 * {@link #close()} is idempotent. It waits (up to {@link NativeMemoryConfig#closeTimeoutMillis()})
 * for calls still running on other threads, so memory is never freed under them. Every method
 * other than {@code close}, {@link #isClosed()}, {@link #name()}, {@link #config()} and
 * {@link #closeReport()} throws {@link IllegalStateException} once the manager is closed (also
 * for calls that race with {@code close}). Invalid arguments (negative sizes, malformed pool
 * paths) throw {@link IllegalArgumentException}; out-of-memory throws
 * {@link NativeOutOfMemoryException}; listener and native failures throw
 * {@link NativeMemoryException}. No Rust panic escapes the native library: it becomes a
 * {@code NativeMemoryException} too.
 *
 * <p>A manager that is never closed keeps its native memory, its reserved bytes and a global
 * reference to its listener until the JVM exits: always close it (Spark: in a task completion
 * listener).
 */
public final class NativeMemoryManager implements AutoCloseable {
    /** Consumer name of reservations made with {@link #newReservation(String, long)}. */
    public static final String DEFAULT_CONSUMER = "jvm";

    private final long handle;
    private final String name;
    private final NativeMemoryConfig config;
    private final AtomicBoolean closed = new AtomicBoolean();
    private volatile NativeCloseReport closeReport;

    private NativeMemoryManager(long handle, String name, NativeMemoryConfig config) {
        this.handle = handle;
        this.name = name;
        this.config = config;
    }

    /**
     * Creates a manager with the {@linkplain NativeMemoryConfig#defaults() default config}. Loads
     * the native library first if needed.
     *
     * @param name name of the manager (the task) in reports and errors
     * @param listener where memory is reserved from; called on whatever thread needs memory
     * @return the new manager; close it
     * @throws NullPointerException if an argument is null
     * @throws UnsatisfiedLinkError if the native library cannot be loaded
     */
    public static NativeMemoryManager create(String name, ReservationListener listener) {
        return create(name, listener, NativeMemoryConfig.defaults());
    }

    /**
     * Creates a manager. Loads the native library first if needed.
     *
     * @param name name of the manager (the task) in reports and errors
     * @param listener where memory is reserved from; called on whatever thread needs memory
     * @param config block size, task limit, close timeout
     * @return the new manager; close it
     * @throws NullPointerException if an argument is null
     * @throws UnsatisfiedLinkError if the native library cannot be loaded
     */
    public static NativeMemoryManager create(String name, ReservationListener listener, NativeMemoryConfig config) {
        Objects.requireNonNull(name, "name");
        Objects.requireNonNull(listener, "listener");
        Objects.requireNonNull(config, "config");
        NativeLibraryLoader.load();
        long handle = nativeCreate(name, listener, config.reservationBlockSize(), config.taskLimitOrMinusOne(),
                config.closeTimeoutMillis(), config.reservationQuantum());
        return new NativeMemoryManager(handle, name, config);
    }

    /** @return the name given at creation */
    public String name() {
        return name;
    }

    /** @return the config given at creation */
    public NativeMemoryConfig config() {
        return config;
    }

    /**
     * The native handle of this manager, for a native engine in its own library: pass it with
     * {@link #nativeApi()} to the engine, which leases the manager through the engine ABI
     * ({@code include/nativemem.h}, or the {@code nativemem-client} Rust crate). It is a
     * generation-checked table index, not a pointer: once the manager is closed, native code using
     * it gets an error code, never a crash.
     *
     * @return the handle (an {@code nm_manager})
     * @throws IllegalStateException if the manager is closed
     */
    public long handle() {
        checkOpen();
        return handle;
    }

    /**
     * @return bytes used by the task now, in all pools (native allocations, reservations, spillers)
     * @throws IllegalStateException if the manager is closed
     */
    public long usedBytes() {
        checkOpen();
        return nativeUsedBytes(handle);
    }

    /**
     * @return the highest {@link #usedBytes()} since creation
     * @throws IllegalStateException if the manager is closed
     */
    public long peakBytes() {
        checkOpen();
        return nativePeakBytes(handle);
    }

    /**
     * @return bytes reserved from the {@link ReservationListener} and not given back; at least
     *     {@link #usedBytes()} (apart from an instant during a concurrent grow)
     * @throws IllegalStateException if the manager is closed
     */
    public long reservedBytes() {
        checkOpen();
        return nativeReservedBytes(handle);
    }

    /**
     * @return a human-readable report: totals, the pool tree with used / peak / limit, and the
     *     largest consumers (the same text out-of-memory errors carry)
     * @throws IllegalStateException if the manager is closed
     */
    public String usageReport() {
        checkOpen();
        return nativeUsageReport(handle);
    }

    /**
     * @return a snapshot of the counters (usage, spills, listener calls)
     * @throws IllegalStateException if the manager is closed
     */
    public NativeMemoryStats stats() {
        checkOpen();
        return NativeMemoryStats.fromArray(nativeStats(handle));
    }

    /**
     * Asks the native spillers to free {@code size} bytes (smallest spiller that covers what is
     * missing first, else the largest, until covered). The freed bytes stay reserved from the
     * listener; to give memory back to the listener use {@link #reclaim(long)}.
     *
     * @param size bytes to free, {@code >= 0}
     * @return bytes the spillers freed (may be less or more than {@code size})
     * @throws IllegalArgumentException if {@code size} is negative
     * @throws NativeMemoryException if a spiller failed
     * @throws IllegalStateException if the manager is closed
     */
    public long spill(long size) {
        checkOpen();
        return nativeSpill(handle, size);
    }

    /**
     * Gives back to the listener up to {@code maxBytes} of the reserved-but-unused cushion,
     * without spilling.
     *
     * @param maxBytes upper bound in bytes, {@code >= 0}
     * @return bytes given back through {@link ReservationListener#unreserve(long)}
     * @throws IllegalArgumentException if {@code maxBytes} is negative
     * @throws NativeMemoryException if the listener threw (its exception is the cause)
     * @throws IllegalStateException if the manager is closed
     */
    public long releaseUnused(long maxBytes) {
        checkOpen();
        return nativeReleaseUnused(handle, maxBytes);
    }

    /**
     * What the listener's owner calls when it needs memory back (Spark:
     * {@code MemoryConsumer.spill(size, trigger)}), in two phases: first the unused reserved
     * cushion is given back, then native spillers are asked for the rest and what they free is
     * given back too. Both go through {@link ReservationListener#unreserve(long)} before this
     * returns, so the return value is exactly what the owner got back (Spark expects
     * {@code spill} to return the bytes released).
     *
     * @param size bytes wanted back, {@code >= 0}
     * @return bytes given back to the listener during this call (0 if nothing could be freed)
     * @throws IllegalArgumentException if {@code size} is negative
     * @throws NativeMemoryException if a spiller or the listener failed
     * @throws IllegalStateException if the manager is closed
     */
    public long reclaim(long size) {
        checkOpen();
        return nativeReclaim(handle, size);
    }

    /**
     * Charges {@code bytes} to the pool at {@code poolPath} for memory JVM code owns (Arrow or
     * Netty off-heap buffers), so JVM and native users share limits, spill and the listener's
     * budget. Same as {@code newReservation(poolPath, DEFAULT_CONSUMER, bytes)}. With a
     * {@linkplain NativeMemoryConfig#reservationQuantum() reservation quantum} the reservation
     * charges the pool in whole quanta and keeps a Java-side slack (see {@link NativeReservation}).
     *
     * @param poolPath pool path below the root, e.g. {@code "scan/arrow"}; created if missing;
     *     {@code ""} or {@code "root"} is the root pool
     * @param bytes initial size, {@code >= 0}
     * @return the reservation; close it when the memory is freed (the manager's close releases it
     *     otherwise and reports it as leaked)
     * @throws NativeOutOfMemoryException if the bytes cannot be obtained (nothing is held then)
     * @throws IllegalArgumentException if the path is malformed (an empty element) or
     *     {@code bytes} negative
     * @throws IllegalStateException if the manager is closed
     */
    public NativeReservation newReservation(String poolPath, long bytes) {
        return newReservation(poolPath, DEFAULT_CONSUMER, bytes);
    }

    /**
     * Like {@link #newReservation(String, long)}, naming the consumer in reports and errors.
     *
     * @param poolPath pool path below the root; created if missing
     * @param consumer consumer name (the report shows it as {@code name#id})
     * @param bytes initial size, {@code >= 0}
     * @return the reservation; close it when the memory is freed
     * @throws NullPointerException if {@code poolPath} or {@code consumer} is null
     * @throws NativeOutOfMemoryException if the bytes cannot be obtained (nothing is held then)
     * @throws IllegalArgumentException if the path is malformed or {@code bytes} negative
     * @throws IllegalStateException if the manager is closed
     */
    public NativeReservation newReservation(String poolPath, String consumer, long bytes) {
        Objects.requireNonNull(poolPath, "poolPath");
        Objects.requireNonNull(consumer, "consumer");
        checkOpen();
        long quantum = config.reservationQuantum();
        if (quantum == 0 || bytes < 0 || bytes > NativeReservation.MAX_QUANTUM_MODE_SIZE) {
            long reservation = nativeReserve(handle, poolPath, consumer, bytes);
            return new NativeReservation(this, reservation, poolPath, consumer);
        }
        // The reservation's Java-side slack (see NativeReservation): charge whole quanta, or
        // exactly the bytes if a limit refuses the rounding.
        long charged = bytes > Long.MAX_VALUE - quantum ? bytes : (bytes + quantum - 1) / quantum * quantum;
        long reservation;
        try {
            reservation = nativeReserve(handle, poolPath, consumer, charged);
        } catch (NativeOutOfMemoryException refused) {
            if (charged == bytes) {
                throw refused;
            }
            charged = bytes;
            reservation = nativeReserve(handle, poolPath, consumer, charged);
        }
        return new NativeReservation(this, reservation, poolPath, consumer, quantum, bytes, charged);
    }

    /** @return true once {@link #close()} has been called */
    public boolean isClosed() {
        return closed.get();
    }

    /**
     * Closes the manager: waits for calls in progress on other threads (up to the close
     * timeout), frees every native allocation still live, releases every reservation (including
     * open {@link NativeReservation}s), forgets the spillers and gives every reserved byte back
     * through {@link ReservationListener#unreserve(long)}. What it had to reclaim is reported in
     * {@link #closeReport()} (and logged natively).
     *
     * <p>Idempotent and thread-safe: only the first call does anything. The manager is closed
     * even if this throws (no new call is accepted).
     *
     * <p><b>Calls during and after close.</b> "During": close has started and waits for a call
     * still running on another thread; "after": it returned. At the Java level every method of
     * this manager and of its {@link NativeReservation}s but the getters and {@code close} throws
     * {@link IllegalStateException} as soon as {@code close} is called, and
     * {@link NativeReservation#close()} is then a no-op (this close releases the reservation). The
     * native calls behind them, given the raw handles, keep the same contract as the engine ABI
     * (the table next to {@code manager_close} in {@code include/nativemem.h}):
     * <ul>
     * <li>on this manager's handle (read-outs, spill, reclaim, release of unused bytes, new
     *     reservations, close): refused during and after, {@code IllegalStateException} "... is stale: it was
     *     closed or destroyed" (close removes the handle first);
     * <li>new work on a reservation of this manager (grow, resize, size): refused,
     *     {@code IllegalStateException} "... is closed" during, "... is stale" after;
     * <li>giving back on a reservation (shrink, close): allowed during (the bytes are released at
     *     once and are not reported as a leak), refused as stale after;
     * <li>calls without a handle (creating another manager, {@link #nativeApi()}, the library's
     *     ABI version check): always allowed.
     * </ul>
     *
     * @throws NativeMemoryException if the listener threw while taking bytes back (its exception
     *     is the cause; native memory is freed, the bytes stay counted on the listener's side), or
     *     if calls in progress did not return within the close timeout (the memory is then freed
     *     when the last of them returns, never under it)
     */
    @Override
    public void close() {
        if (!closed.compareAndSet(false, true)) {
            return;
        }
        Object[] result = nativeClose(handle);
        closeReport = NativeCloseReport.fromNative((String) result[0], (long[]) result[1], (String[]) result[2]);
    }

    /**
     * @return after a successful {@link #close()}: what it reclaimed (leaks by pool and consumer,
     *     bytes given back to the listener) as fields, with the readable text for logs in
     *     {@link NativeCloseReport#text()} (e.g. {@code "'task-1' closed with no leaks"});
     *     {@code null} before close or if close failed
     */
    public NativeCloseReport closeReport() {
        return closeReport;
    }

    @Override
    public String toString() {
        return "NativeMemoryManager{name='" + name + "', handle=" + hex(handle)
                + (closed.get() ? ", closed" : "") + "}";
    }

    /**
     * The address of the engine ABI's function table ({@code const nm_api *} of
     * {@code include/nativemem.h}), for native engines in their own shared library: they cannot
     * look the table up by symbol because the JVM loads libraries privately ({@code RTLD_LOCAL}).
     * The table is immutable and valid for the life of the JVM. Loads the native library first
     * if needed. Check its {@code abi_version} and {@code struct_size} before use
     * ({@code nm_api_check}).
     *
     * @return the table's address, never 0
     * @throws UnsatisfiedLinkError if the native library cannot be loaded
     */
    public static long nativeApi() {
        NativeLibraryLoader.load();
        return nativeApiAddress();
    }

    /** The native handle even after close (package-private: for tests of stale handles). */
    long nativeHandle() {
        return handle;
    }

    void checkOpen() {
        if (closed.get()) {
            throw closedException();
        }
    }

    /** The exception of a call on this manager, or on what belongs to it, once it is closed. */
    IllegalStateException closedException() {
        return new IllegalStateException("NativeMemoryManager '" + name + "' (handle " + hex(handle) + ") is closed");
    }

    /** A handle as the native library prints it: {@code 0x} and 16 hex digits. */
    static String hex(long handle) {
        return String.format("0x%016x", handle);
    }

    // Native methods: the handle is always the first argument. Package-private so tests in this
    // package can pass stale and forged handles; not part of the API.

    static native long nativeApiAddress();

    static native long nativeCreate(String name, ReservationListener listener, long reservationBlockBytes,
            long taskLimitBytes, long closeTimeoutMillis, long reservationQuantumBytes);

    /** Returns {String text, long[] numbers, String[] names}: see NativeCloseReport.fromNative. */
    static native Object[] nativeClose(long handle);

    static native long nativeUsedBytes(long handle);

    static native long nativePeakBytes(long handle);

    static native long nativeReservedBytes(long handle);

    static native String nativeUsageReport(long handle);

    static native long[] nativeStats(long handle);

    static native long nativeSpill(long handle, long bytes);

    static native long nativeReleaseUnused(long handle, long maxBytes);

    static native long nativeReclaim(long handle, long bytes);

    static native long nativeReserve(long handle, String poolPath, String consumer, long bytes);

    /** Live native handles in this process: {managers, reservations}. For tests and diagnostics. */
    static native long[] nativeLiveHandles();
}
