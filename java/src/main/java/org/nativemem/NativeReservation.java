package org.nativemem;

import java.util.concurrent.atomic.AtomicLong;

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
 *
 * <h2>Java-side slack (the manager's reservation quantum)</h2>
 * With a {@linkplain NativeMemoryConfig#reservationQuantum() reservation quantum} {@code q > 0}
 * (the default, 1 MiB) the native reservation is <i>charged</i> in multiples of a quantum and
 * most grows and shrinks are served from the bytes already charged (the <i>slack</i>) with two
 * atomic operations and no JNI call. The quantum grows with the reservation as the native one's
 * does: {@code q} up to {@code 16 q} held, then {@code q} times the power of two at or above
 * {@code size / 16 q}, at most {@code 8 q} ({@link #quantumFor}). A grow past the slack charges
 * its shortfall rounded up to the quantum; a shrink that leaves more than two quanta of slack
 * gives back all but one. {@link #size()} and {@link #peakBytes()} stay exact (what the caller
 * grew minus shrank, and its peak); the native side (pools, the task, the usage report's consumer
 * line, a leak report) sees the charged bytes: at most two quanta above {@link #size()} once
 * calls return (one after a refused grow), plus what the native reservation's own quantum keeps
 * in the pools, and nothing after {@link #close()}. Spark's reclaim does not take this slack.
 * With {@code q = 0} (exact accounting) every call is one JNI call, as before, and the native
 * reservation is exact too.
 *
 * <p>The protocol. Three counters, each an {@code AtomicLong}: {@code used} (the exact size),
 * {@code slack} (charged bytes nobody holds) and {@code charged} (the native reservation's
 * size, as this object last changed it). At every instant
 * {@code used + slack <= charged} and {@code used + slack <=} the native size, hence
 * {@code used <=} both:
 * <ul>
 *   <li>a grow first takes its bytes out of {@code slack} (CAS, only if {@code slack >= bytes}),
 *       then adds them to {@code used}; a shrink first takes them out of {@code used} (CAS, only
 *       if {@code used >= bytes}), then adds them to {@code slack}. Between the two steps the
 *       bytes are in neither counter, so the sum is below what is charged, never above;</li>
 *   <li>a grow the slack cannot cover (the slow path) grows the native reservation by its
 *       shortfall rounded up to the quantum (if the pools refuse that, once more by exactly the
 *       shortfall, so rounding never refuses what fits), then raises {@code charged}, then
 *       {@code slack}, and takes its bytes with the same CAS (again if another thread took them
 *       first);</li>
 *   <li>a trim (when a shrink or a slow grow leaves more than two quanta of slack: down to
 *       one; after a refusal: down to one if above) takes the surplus out of
 *       {@code slack} with one CAS first, then shrinks the native reservation, then lowers
 *       {@code charged}. A grow can only take bytes that are in {@code slack}, so a trim never
 *       gives back bytes a grow counted on, and every byte is in exactly one of {@code used},
 *       {@code slack}, one thread's hands between two steps, or given back.</li>
 * </ul>
 * Every thread that adds to {@code slack} checks the bound afterwards, so once calls stop the
 * slack is at most two quanta. No lock is held on any path: the slow path's JNI call may reach
 * the listener and make Spark spill, which may shrink or grow this reservation from the same or
 * another thread; a lock held across it could deadlock (the native side holds none either).
 * Concurrent slow grows may each charge a quantum; the bound check gives the surplus back. The
 * peak costs a grow nothing: a decrease of {@code used} first raises {@code peak} to the value it
 * leaves, so the peak is {@code max(used, peak)}.
 * {@link #close()} releases the native reservation, slack included, once.
 */
public final class NativeReservation extends NativeObject {
    private final String poolPath;
    private final String consumer;
    /** The Java-side quantum; 0: every call goes to the native reservation (exact accounting). */
    private final long quantum;
    /** Exact bytes held (quantum mode). */
    private final AtomicLong used = new AtomicLong();
    /** Charged bytes that {@link #used} does not hold (quantum mode). */
    private final AtomicLong slack = new AtomicLong();
    /**
     * Highest value {@link #used} left by a decrease (quantum mode): the peak is
     * {@code max(used, peak)}, so a grow pays no second atomic operation for it (see
     * {@link #peakBytes()}).
     */
    private final AtomicLong peak = new AtomicLong();
    /** The native reservation's size as this object changed it (quantum mode). */
    private final AtomicLong charged = new AtomicLong();

    NativeReservation(NativeMemoryManager manager, long handle, String poolPath, String consumer) {
        this(manager, handle, poolPath, consumer, 0, 0, 0);
    }

    /**
     * @param quantum the Java-side quantum, 0 for exact accounting
     * @param size bytes the caller asked for at creation (quantum mode)
     * @param charged the native reservation's size at creation, {@code >= size} (quantum mode)
     */
    NativeReservation(NativeMemoryManager manager, long handle, String poolPath, String consumer, long quantum,
            long size, long charged) {
        super(manager, handle);
        this.poolPath = poolPath;
        this.consumer = consumer;
        this.quantum = quantum;
        this.used.set(size);
        this.peak.set(size);
        this.slack.set(charged - size);
        this.charged.set(charged);
    }

    /**
     * Grows by {@code bytes}, reserving from the listener (and spilling native consumers) if the
     * manager's cushion is short. With a quantum, a grow within the slack makes no JNI call.
     *
     * @param bytes bytes to add, {@code >= 0}
     * @throws NativeOutOfMemoryException if they cannot be obtained; nothing changed
     * @throws NativeMemoryException if the listener threw or broke its contract; nothing changed
     * @throws IllegalArgumentException if {@code bytes} is negative
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public void grow(long bytes) {
        checkOpen();
        if (quantum == 0) {
            nativeGrow(handle(), bytes);
            return;
        }
        checkNonNegative("bytes", bytes);
        takeSlack(bytes);
        used.addAndGet(bytes);
    }

    /**
     * Shrinks by {@code bytes}. The bytes return to the manager's cushion (and to the listener
     * beyond two blocks of unused cushion); with a quantum, to this reservation's slack first
     * (no JNI call until it exceeds two quanta).
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
        if (quantum == 0) {
            nativeShrink(handle(), bytes);
            return;
        }
        checkNonNegative("bytes", bytes);
        for (;;) {
            long u = used.get();
            if (bytes > u) {
                throw new IllegalArgumentException("cannot shrink reservation '" + consumer + "' in pool '" + poolPath
                        + "' by " + Bytes.human(bytes) + " (" + bytes + " bytes): it holds " + Bytes.human(u) + " ("
                        + u + " bytes)");
            }
            raisePeak(u); // before u is left: see peakBytes
            if (used.compareAndSet(u, u - bytes)) {
                break;
            }
        }
        returnSlack(bytes);
    }

    /**
     * Grows or shrinks to exactly {@code newSize} bytes.
     *
     * @param newSize the new size, {@code >= 0}
     * @throws NativeOutOfMemoryException if a grow cannot be satisfied; nothing changed
     * @throws NativeMemoryException if the listener threw; see {@link #grow} and {@link #shrink}
     * @throws IllegalArgumentException if {@code newSize} is negative
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public void resize(long newSize) {
        checkOpen();
        if (quantum == 0) {
            nativeResize(handle(), newSize);
            return;
        }
        checkNonNegative("newSize", newSize);
        for (;;) {
            long u = used.get();
            if (newSize <= u) {
                raisePeak(u);
                if (used.compareAndSet(u, newSize)) {
                    returnSlack(u - newSize);
                    return;
                }
                continue;
            }
            long add = newSize - u;
            takeSlack(add);
            if (used.compareAndSet(u, newSize)) {
                return;
            }
            returnSlack(add); // another thread changed the size meanwhile: start again
        }
    }

    /**
     * @return bytes held now: what was grown minus what was shrunk (not the charged slack)
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public long size() {
        checkOpen();
        return quantum == 0 ? nativeSize(handle()) : used.get();
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
        if (quantum == 0) {
            return nativePeak(handle());
        }
        // Every value used took is below a later one, or is the current one, or was left by a
        // decrease, which raised peak to it first. Reading used before peak misses none.
        long now = used.get();
        return Math.max(now, peak.get());
    }

    /**
     * @return bytes charged to the native reservation now: {@link #size()} plus the slack
     *     (package-private: for tests)
     */
    long chargedBytes() {
        return quantum == 0 ? nativeSize(handle()) : charged.get();
    }

    /** @return the Java-side quantum, 0 for exact accounting (package-private: for tests) */
    long quantum() {
        return quantum;
    }

    /** Takes {@code bytes} out of the slack, charging more quanta first if it is short. */
    private void takeSlack(long bytes) {
        for (long s = slack.get(); s >= bytes; s = slack.get()) {
            if (slack.compareAndSet(s, s - bytes)) {
                return;
            }
        }
        slowTake(bytes);
    }

    /** Puts {@code bytes} back into the slack; trims it if that leaves more than two quanta. */
    private void returnSlack(long bytes) {
        long s = slack.addAndGet(bytes);
        if (s > 2 * quantum && s > 2 * quantumFor(used.get())) {
            trimAbove(2);
        }
    }

    /** The slow path of {@link #takeSlack}: grows the native reservation until the slack covers. */
    private void slowTake(long bytes) {
        for (;;) {
            long s = slack.get();
            if (s >= bytes) {
                if (slack.compareAndSet(s, s - bytes)) {
                    break;
                }
                continue;
            }
            long need = bytes - s;
            long q = quantumFor(used.get() + bytes);
            long rounded = need > Long.MAX_VALUE - q ? need : (need + q - 1) / q * q;
            long grown;
            try {
                grown = growNative(need, rounded);
            } catch (NativeMemoryException e) {
                // Refused; nothing changed natively. Bytes an earlier round of this loop charged
                // may be left in the slack: keep at most one quantum.
                try {
                    trimAbove(1);
                } catch (RuntimeException t) {
                    e.addSuppressed(t);
                }
                throw e;
            }
            charged.addAndGet(grown);
            slack.addAndGet(grown);
        }
        if (slack.get() > 2 * quantum) { // other slow grows charged meanwhile
            try {
                trimAbove(2);
            } catch (NativeMemoryException e) {
                // The listener threw while taking surplus back: the native reservation did
                // shrink and the bytes stay reserved (see shrink); the grow itself succeeded.
            }
        }
    }

    /**
     * Grows the native reservation by {@code rounded}, or if the pools refuse that, by exactly
     * {@code need}.
     *
     * @return the bytes it grew by
     */
    private long growNative(long need, long rounded) {
        if (rounded != need) {
            try {
                nativeGrow(handle(), rounded);
                return rounded;
            } catch (NativeOutOfMemoryException refused) {
                // A limit between need and the quantum's edge: fall through to the exact grow.
            }
        }
        nativeGrow(handle(), need);
        return need;
    }

    /**
     * If the slack exceeds {@code quanta} times {@link #quantumFor} the size, gives back all of it
     * but one such quantum.
     */
    private void trimAbove(int quanta) {
        for (;;) {
            long s = slack.get();
            long q = quantumFor(used.get());
            if (s <= quanta * q) {
                return;
            }
            if (slack.compareAndSet(s, q)) {
                long release = s - q;
                try {
                    nativeShrink(handle(), release);
                } catch (NativeMemoryException e) {
                    charged.addAndGet(-release); // the native reservation did shrink (see shrink)
                    throw e;
                }
                charged.addAndGet(-release);
                return;
            }
        }
    }

    /**
     * The quantum for a reservation of {@code size} bytes: it grows with the reservation, as the
     * native reservation's does (README, "The fast path: reservation quantum"), so a large one
     * makes few JNI calls: {@code q} up to {@code 16 q}, then {@code q} times the power of two at
     * or above {@code size / 16 q}, at most {@code 8 q}.
     *
     * @return a multiple of the configured quantum (package-private: for tests)
     */
    long quantumFor(long size) {
        long q = quantum;
        if (size <= 16 * q) {
            return q;
        }
        long k = size / (16 * q); // >= 1
        long pow2 = Long.highestOneBit(k) == k ? k : Long.highestOneBit(k) << 1;
        return q * Math.min(pow2, 8);
    }

    private void raisePeak(long size) {
        for (;;) {
            long p = peak.get();
            if (size <= p || peak.compareAndSet(p, size)) {
                return;
            }
        }
    }

    private static void checkNonNegative(String name, long value) {
        if (value < 0) {
            throw new IllegalArgumentException(name + " must be >= 0, got " + value);
        }
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
