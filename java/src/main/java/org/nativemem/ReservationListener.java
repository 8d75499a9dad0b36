package org.nativemem;

/**
 * Where a {@link NativeMemoryManager} gets its memory budget from. In Spark this is a
 * {@code MemoryConsumer} of the task's {@code TaskMemoryManager}; in tests, a counter.
 *
 * <p>The native manager calls the listener rarely: it reserves whole blocks of
 * {@link NativeMemoryConfig#reservationBlockSize()} bytes (8 MiB by default) and serves native
 * grows from that reserved cushion without calling Java; it gives bytes back only when more than
 * two blocks lie unused (hysteresis), when asked to ({@link NativeMemoryManager#releaseUnused},
 * {@link NativeMemoryManager#reclaim}) and at {@link NativeMemoryManager#close()}.
 *
 * <h2>Contract</h2>
 * <ul>
 *   <li>{@link #reserve(long)} returns the bytes granted, between {@code 0} and the bytes asked.
 *       Granting less (even 0) is allowed: the manager then asks its native spillers to free
 *       memory and, if still short, fails the request with {@link NativeOutOfMemoryException}.
 *   <li>Returning a negative value is a contract violation: nothing is counted as granted and the
 *       request fails with {@link NativeMemoryException}. Returning more than asked is a contract
 *       violation too: the whole grant is counted as reserved (it will be handed back through
 *       {@link #unreserve(long)}, at the latest by {@code close()}) and the request fails with
 *       {@link NativeMemoryException}. Either way the manager's accounting stays exact.
 *   <li>If {@code reserve} throws, nothing is counted as granted and the native call that needed
 *       the memory fails in its caller: a {@link RuntimeException} (or any non-{@link Error}
 *       throwable) arrives as a {@link NativeMemoryException} whose
 *       {@linkplain Throwable#getCause() cause} is the very exception thrown; an {@link Error}
 *       (e.g. Spark's {@code SparkOutOfMemoryError}) is rethrown unchanged.
 *   <li>{@link #unreserve(long)} gives back bytes previously granted (any amount up to what is
 *       still reserved; not necessarily a block multiple). If it throws, the manager keeps
 *       counting the bytes as reserved and offers them again at the next release or at close;
 *       the call that released them fails as above.
 *   <li>After {@code close()} returns normally, every byte ever granted has been given back.
 * </ul>
 *
 * <h2>Threads</h2>
 * The listener is called on the thread whose request needs memory: any Java thread calling the
 * manager, or a native operator thread (attached to the JVM once, as a daemon thread). Calls may
 * come from several threads at once, so implementations must be thread-safe. The native library
 * holds no lock of its own during the call, so the listener may block and may call back into the
 * same manager — for example Spark's {@code MemoryConsumer.spill} calling
 * {@link NativeMemoryManager#reclaim(long)} while {@code acquireMemory} runs. It must not
 * {@linkplain NativeMemoryManager#close() close} the manager it serves: close would have to wait
 * for the very call the listener is running in, so it is deferred until that call returns.
 */
public interface ReservationListener {
    /**
     * Asks for more memory.
     *
     * @param bytes bytes needed, {@code > 0}; usually a multiple of the reservation block size
     * @return bytes granted, between {@code 0} and {@code bytes}
     */
    long reserve(long bytes);

    /**
     * Gives back memory previously granted by {@link #reserve(long)}.
     *
     * @param bytes bytes given back, {@code > 0}
     */
    void unreserve(long bytes);
}
