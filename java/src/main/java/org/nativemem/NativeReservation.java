package org.nativemem;

/**
 * A claim of bytes on a pool of a {@link NativeMemoryManager}, for memory JVM code owns (Arrow
 * or Netty off-heap buffers, direct byte buffers): {@link #grow(long)} before allocating,
 * {@link #shrink(long)} after freeing, {@link #close()} when done. The bytes count against the
 * pool's and the task's limits and the listener's budget exactly like native memory.
 *
 * <p>Created by {@link NativeMemoryManager#newReservation(String, long)}. Thread-safe. Failing calls
 * change nothing: a refused grow leaves the size as it was, shrinking by more than is held is
 * an {@link IllegalArgumentException}. After {@link #close()}, or after the manager is closed,
 * every method but {@code close}, {@link #isClosed()} and the getters throws
 * {@link IllegalStateException}.
 */
public final class NativeReservation extends NativeObject {
    private final String poolPath;
    private final String consumer;

    NativeReservation(NativeMemoryManager manager, long handle, String poolPath, String consumer) {
        super(manager, handle);
        this.poolPath = poolPath;
        this.consumer = consumer;
    }

    /**
     * Grows by {@code bytes}, reserving from the listener (and spilling native consumers) if the
     * manager's cushion is short.
     *
     * @param bytes bytes to add, {@code >= 0}
     * @throws NativeOutOfMemoryException if they cannot be obtained; nothing changed
     * @throws NativeMemoryException if the listener threw or broke its contract; nothing changed
     * @throws IllegalArgumentException if {@code bytes} is negative
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public void grow(long bytes) {
        checkOpen();
        nativeGrow(handle(), bytes);
    }

    /**
     * Shrinks by {@code bytes}. The bytes return to the manager's cushion (and to the listener
     * beyond two blocks of unused cushion).
     *
     * @param bytes bytes to release, {@code 0 <= bytes <= size()}
     * @throws IllegalArgumentException if {@code bytes} is negative or more than held; nothing
     *     changed
     * @throws NativeMemoryException if the listener threw while taking surplus bytes back (the
     *     reservation did shrink; the bytes stay reserved and are offered again later)
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public void shrink(long bytes) {
        checkOpen();
        nativeShrink(handle(), bytes);
    }

    /**
     * Grows or shrinks to exactly {@code newSize} bytes.
     *
     * @param newSize the new size, {@code >= 0}
     * @throws NativeOutOfMemoryException if a grow cannot be satisfied; nothing changed
     * @throws IllegalArgumentException if {@code newSize} is negative
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public void resize(long newSize) {
        checkOpen();
        nativeResize(handle(), newSize);
    }

    /**
     * @return bytes held now
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public long size() {
        checkOpen();
        return nativeSize(handle());
    }

    /**
     * The most bytes this reservation has held: its consumer's peak, what an engine publishes as
     * an operator's "peak memory" SQL metric. The task's peak is
     * {@link NativeMemoryManager#peakBytes()}.
     *
     * @return the highest {@link #size()} so far
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public long peakBytes() {
        checkOpen();
        return nativePeak(handle());
    }

    /** @return the pool path given at creation */
    public String poolPath() {
        return poolPath;
    }

    /** @return the consumer name given at creation */
    public String consumer() {
        return consumer;
    }

    /** The native handle (package-private: for tests of handle misuse). */
    long nativeHandle() {
        return handle();
    }

    /**
     * Releases everything held ({@link NativeObject#close()}: idempotent and thread-safe; a no-op
     * once the manager is closed, which released it). Never fails because of the listener: if it
     * throws while taking surplus bytes back, that is logged natively and the bytes stay
     * reserved, offered again at the next release or at the manager's close.
     */
    @Override
    protected void closeNative() {
        nativeClose(handle());
    }

    @Override
    protected String describe() {
        return "NativeReservation '" + consumer + "' in pool '" + poolPath + "' (handle " + hexHandle() + ")";
    }

    /** The manager's own message: the reservation is usable as long as its manager is. */
    @Override
    protected IllegalStateException managerClosed() {
        return manager().closedException();
    }

    @Override
    public String toString() {
        return "NativeReservation{consumer='" + consumer + "', pool='" + poolPath + "', handle=" + hexHandle()
                + (isClosed() ? ", closed" : "") + "}";
    }

    // Native methods: the reservation handle first. Package-private for tests; not API.

    static native void nativeGrow(long handle, long bytes);

    static native void nativeShrink(long handle, long bytes);

    static native void nativeResize(long handle, long newSize);

    static native long nativeSize(long handle);

    static native long nativePeak(long handle);

    static native void nativeClose(long handle);
}
