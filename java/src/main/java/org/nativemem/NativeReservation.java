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
 * most grows and shrinks are served from the bytes already charged (the <i>slack</i>) with one
 * compare-and-set and no JNI call. The quantum grows with the reservation as the native one's
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
 * <p>The protocol. Two words: {@code state} (an {@code AtomicLong}: the exact size
 * {@code used} in its low {@value #USED_BITS} bits, a <i>trimming</i> flag and a version above)
 * and {@code charged} (an {@code AtomicLong}: the native reservation's size as this object
 * changed it). The slack is {@code charged - used}. At every instant {@code used <= charged
 * <=} the native reservation's size:
 * <ul>
 *   <li>a grow reads {@code state}, then {@code charged}, and if {@code used + bytes <= charged}
 *       and no trim is under way, compare-and-sets {@code state} to {@code used + bytes}, same
 *       flag and version: one CAS, no JNI call. A shrink compare-and-sets {@code state} down
 *       (only if {@code used >= bytes}).</li>
 *   <li>a grow past {@code charged} grows the native reservation by the shortfall rounded up to
 *       the quantum (if the pools refuse that, once more by exactly the shortfall, so rounding
 *       never refuses what fits), then raises {@code charged}, then retries its CAS.</li>
 *   <li>a trim (when a shrink or a slow grow leaves more than two quanta of slack: down to one;
 *       after a refusal: down to one if above) sets the trimming flag with a CAS on
 *       {@code state}, lowers {@code charged} to {@code used} plus one quantum, clears the flag
 *       and bumps the version (one CAS), and only then shrinks the native reservation. While
 *       the flag is set {@code used} can only go down (grows wait for the few instructions of
 *       the window, which holds no lock and makes no call); a grow that read {@code state}
 *       before the window fails its CAS (the flag or the version changed), so no grow can
 *       count on bytes a trim gives back. {@code charged} only moves by atomic adds.</li>
 * </ul>
 * Every thread that leaves surplus slack checks the bound afterwards, so once calls stop the
 * slack is at most two quanta. No lock is held across a JNI call: the slow path's call may reach
 * the listener and make Spark spill, which may shrink or grow this reservation from the same or
 * another thread (the native side holds no lock there either). Concurrent slow grows may each
 * charge a quantum; the bound check gives the surplus back. The peak costs a grow nothing: a
 * decrease of {@code used} first raises {@code peak} to the value it leaves, so the peak is
 * {@code max(used, peak)}. {@link #close()} releases the native reservation, slack included,
 * once. A reservation with the quantum holds at most {@link #MAX_QUANTUM_MODE_SIZE} bytes (128
 * TiB): a grow past it is refused.
 */
public final class NativeReservation extends NativeObject {
    /** Bits of {@code state} holding the size. */
    static final int USED_BITS = 47;
    /** The largest size of a reservation with a quantum: 128 TiB - 1. */
    static final long MAX_QUANTUM_MODE_SIZE = (1L << USED_BITS) - 1;
    private static final long TRIMMING = 1L << USED_BITS;
    private static final long VERSION_UNIT = TRIMMING << 1;

    private final String poolPath;
    private final String consumer;
    /** The Java-side quantum; 0: every call goes to the native reservation (exact accounting). */
    private final long quantum;
    /** Size, trimming flag, version (quantum mode; see the class doc). */
    private final AtomicLong state = new AtomicLong();
    /** The native reservation's size as this object changed it (quantum mode). */
    private final AtomicLong charged = new AtomicLong();
    /**
     * Highest size left by a decrease (quantum mode): the peak is {@code max(size, peak)}, so a
     * grow pays nothing for it (see {@link #peakBytes()}).
     */
    private final AtomicLong peak = new AtomicLong();

    NativeReservation(NativeMemoryManager manager, long handle, String poolPath, String consumer) {
        this(manager, handle, poolPath, consumer, 0, 0, 0);
    }

    /**
     * @param quantum the Java-side quantum, 0 for exact accounting
     * @param size bytes the caller asked for at creation (quantum mode), at most
     *     {@link #MAX_QUANTUM_MODE_SIZE}
     * @param charged the native reservation's size at creation, {@code >= size} (quantum mode)
     */
    NativeReservation(NativeMemoryManager manager, long handle, String poolPath, String consumer, long quantum,
            long size, long charged) {
        super(manager, handle);
        this.poolPath = poolPath;
        this.consumer = consumer;
        this.quantum = quantum;
        this.state.set(size);
        this.peak.set(size);
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
        long w = state.get();
        long n = (w & MAX_QUANTUM_MODE_SIZE) + bytes;
        // Out of range (or overflowed) if any bit above the size is set. Reading charged after
        // state: see the class doc.
        if ((w & TRIMMING) == 0 && (n & ~MAX_QUANTUM_MODE_SIZE) == 0 && n <= charged.get()
                && state.compareAndSet(w, w + bytes)) {
            return;
        }
        slowGrow(bytes);
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
            long w = state.get();
            long u = w & MAX_QUANTUM_MODE_SIZE;
            if (bytes > u) {
                throw new IllegalArgumentException("cannot shrink reservation '" + consumer + "' in pool '" + poolPath
                        + "' by " + Bytes.human(bytes) + " (" + bytes + " bytes): it holds " + Bytes.human(u) + " ("
                        + u + " bytes)");
            }
            raisePeak(u); // before u is left: see peakBytes
            if (state.compareAndSet(w, w - bytes)) {
                trimIfAbove(2, u - bytes);
                return;
            }
        }
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
            long w = state.get();
            long u = w & MAX_QUANTUM_MODE_SIZE;
            if (newSize <= u) {
                raisePeak(u);
                if (state.compareAndSet(w, w - (u - newSize))) {
                    trimIfAbove(2, newSize);
                    return;
                }
            } else if (tryGrowFrom(w, newSize - u)) {
                return;
            }
        }
    }

    /**
     * @return bytes held now: what was grown minus what was shrunk (not the charged slack)
     * @throws IllegalStateException if this reservation or its manager is closed
     */
    public long size() {
        checkOpen();
        return quantum == 0 ? nativeSize(handle()) : state.get() & MAX_QUANTUM_MODE_SIZE;
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
        // Every size so far is below a later one, or is the current one, or was left by a
        // decrease, which raised peak to it first. Reading the size before peak misses none.
        long now = state.get() & MAX_QUANTUM_MODE_SIZE;
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

    /** The slow path of {@link #grow}: charges quanta until the grow fits. */
    private void slowGrow(long bytes) {
        for (;;) {
            if (tryGrowFrom(state.get(), bytes)) {
                return;
            }
        }
    }

    /**
     * One attempt to grow by {@code bytes} from state {@code w}: charges the native reservation
     * first if needed.
     *
     * @return true if grown; false if {@code state} changed meanwhile (try again)
     * @throws NativeOutOfMemoryException if refused; nothing changed, surplus slack given back
     */
    private boolean tryGrowFrom(long w, long bytes) {
        if ((w & TRIMMING) != 0) {
            Thread.yield(); // a trim's window: a few instructions on another thread
            return false;
        }
        long n = (w & MAX_QUANTUM_MODE_SIZE) + bytes;
        if (n < 0 || n > MAX_QUANTUM_MODE_SIZE) {
            throw new NativeOutOfMemoryException("cannot grow reservation '" + consumer + "' in pool '" + poolPath
                    + "' by " + bytes + " bytes: a NativeReservation with a reservation quantum holds at most "
                    + MAX_QUANTUM_MODE_SIZE + " bytes");
        }
        long c = charged.get();
        if (n <= c) {
            if (!state.compareAndSet(w, w + bytes)) {
                return false;
            }
            if (c - n > 2 * quantum) {
                try {
                    trimIfAbove(2, n); // other slow grows charged meanwhile
                } catch (NativeMemoryException e) {
                    // The listener threw while taking surplus back: the native reservation did
                    // shrink and the bytes stay reserved (see shrink); the grow itself succeeded.
                }
            }
            return true;
        }
        long need = n - c;
        long q = quantumFor(n);
        long rounded = need > Long.MAX_VALUE - q ? need : (need + q - 1) / q * q;
        long grown;
        try {
            grown = growNative(need, rounded);
        } catch (NativeMemoryException e) {
            // Refused; nothing changed natively. Bytes an earlier round charged may be left in
            // the slack: keep at most one quantum.
            try {
                trimIfAbove(1, state.get() & MAX_QUANTUM_MODE_SIZE);
            } catch (RuntimeException t) {
                e.addSuppressed(t);
            }
            throw e;
        }
        charged.addAndGet(grown);
        return false;
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
     * If the slack exceeds {@code quanta} times the quantum of the size, gives back all of it but
     * one quantum. {@code sizeHint} is a size just seen, for a cheap first check.
     */
    private void trimIfAbove(int quanta, long sizeHint) {
        if (charged.get() - sizeHint <= quanta * quantum) {
            return; // the common case: at most the configured quantum's bound
        }
        for (;;) {
            long w = state.get();
            if ((w & TRIMMING) != 0) {
                Thread.yield(); // another trim's window: a few instructions on another thread
                continue;
            }
            long u = w & MAX_QUANTUM_MODE_SIZE;
            long q = quantumFor(u);
            if (charged.get() - u <= quanta * q) {
                return;
            }
            if (!state.compareAndSet(w, w | TRIMMING)) {
                continue;
            }
            // The window: the size can only go down, charged only up (slow grows' adds).
            long release = charged.get() - (u + q);
            if (release > 0) {
                charged.addAndGet(-release);
            }
            for (;;) {
                long t = state.get();
                if (state.compareAndSet(t, ((t & ~TRIMMING) + VERSION_UNIT) & Long.MAX_VALUE)) {
                    break;
                }
            }
            if (release > 0) {
                nativeShrink(handle(), release); // a NativeMemoryException: it did shrink
            }
            return;
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
