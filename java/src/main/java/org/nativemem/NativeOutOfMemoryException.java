package org.nativemem;

/**
 * A memory request could not be satisfied: a pool limit (or the task limit) would have been
 * exceeded, or the {@link ReservationListener} granted too little even after native consumers
 * were spilled.
 *
 * <p>The fields say what happened, so callers never parse the message: {@link #requestedBytes()},
 * {@link #pool()}, {@link #consumer()}, {@link #reason()} (and {@link #refusingPool()} for a limit),
 * and {@link #usageReport()}. The message is the readable diagnosis: the first line says what was
 * asked, for which consumer, in which pool and why it was refused; the rest is the manager's usage
 * report (the pool tree with used / peak / limit and the largest consumers, in human units), the
 * same text as {@link NativeMemoryManager#usageReport()} at the moment of the refusal.
 *
 * <p>When it is thrown nothing changed: the request was rolled back entirely.
 */
public class NativeOutOfMemoryException extends NativeMemoryException {
    private static final long serialVersionUID = 2L;

    /** Why a request was refused. */
    public enum Reason {
        /** A pool's limit (or the task limit, the root's) would have been exceeded. */
        POOL_LIMIT,
        /** The listener (Spark) granted less than needed, even after spilling. */
        LISTENER_DENIED,
        /** The system allocator returned no memory. */
        SYSTEM_ALLOCATOR,
        /** Not known (an exception built from a message only). */
        UNKNOWN
    }

    private final long requestedBytes;
    private final String pool;
    private final String consumer;
    private final Reason reason;
    private final String refusingPool;
    private final String usageReport;

    /**
     * An exception with only a message ({@link #reason()} is {@link Reason#UNKNOWN}).
     *
     * @param message the refusal and the usage report
     */
    public NativeOutOfMemoryException(String message) {
        this(message, -1, null, null, Reason.UNKNOWN.name(), null, null);
    }

    /**
     * @param message the readable diagnosis
     * @param requestedBytes bytes asked
     * @param pool path of the pool they were asked in
     * @param consumer the consumer that asked
     * @param reason a {@link Reason} name
     * @param refusingPool for {@link Reason#POOL_LIMIT}: the pool whose limit was hit; else null
     * @param usageReport the usage report at the refusal
     */
    public NativeOutOfMemoryException(String message, long requestedBytes, String pool, String consumer,
            String reason, String refusingPool, String usageReport) {
        super(message);
        this.requestedBytes = requestedBytes;
        this.pool = pool;
        this.consumer = consumer;
        this.reason = parseReason(reason);
        this.refusingPool = refusingPool;
        this.usageReport = usageReport;
    }

    private static Reason parseReason(String name) {
        for (Reason r : Reason.values()) {
            if (r.name().equals(name)) {
                return r;
            }
        }
        return Reason.UNKNOWN;
    }

    /** @return bytes asked, or -1 if not known */
    public long requestedBytes() {
        return requestedBytes;
    }

    /** @return the path of the pool the bytes were asked in, or null if not known */
    public String pool() {
        return pool;
    }

    /** @return the consumer that asked ({@code name#id}), or null if not known */
    public String consumer() {
        return consumer;
    }

    /** @return why the request was refused */
    public Reason reason() {
        return reason;
    }

    /** @return for {@link Reason#POOL_LIMIT}: the pool whose limit was hit (the asking pool or an
     *     ancestor); null otherwise */
    public String refusingPool() {
        return refusingPool;
    }

    /** @return the usage report at the refusal (the message's body), or null if not known */
    public String usageReport() {
        return usageReport;
    }
}
