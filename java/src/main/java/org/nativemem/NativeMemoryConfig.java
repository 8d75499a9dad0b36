package org.nativemem;

import java.util.OptionalLong;

/**
 * Immutable configuration of a {@link NativeMemoryManager}. Start from {@link #defaults()} and
 * derive copies:
 *
 * <pre>{@code
 * NativeMemoryConfig config = NativeMemoryConfig.defaults()
 *     .withReservationBlockSize(16L << 20)   // ask the listener for 16 MiB at a time
 *     .withTaskLimit(2L << 30)               // never use more than 2 GiB natively
 *     .withReservationQuantum(0);            // exact accounting (opt-in; default: the 1 MiB quantum)
 * }</pre>
 *
 * Every {@code with...} method validates its argument and throws
 * {@link IllegalArgumentException} for a value the native manager would refuse, so a config
 * that exists is a config {@link NativeMemoryManager#create} accepts. Instances are immutable and
 * thread-safe.
 */
public final class NativeMemoryConfig {
    /** Default reservation block: 8 MiB, so at most 128 listener calls per GiB grown. */
    public static final long DEFAULT_RESERVATION_BLOCK_BYTES = 8L << 20;
    /** Largest reservation block accepted: 2^62 bytes. */
    public static final long MAX_RESERVATION_BLOCK_BYTES = 1L << 62;
    /** Largest reservation quantum accepted: 1 TiB. */
    public static final long MAX_RESERVATION_QUANTUM_BYTES = 1L << 40;
    /**
     * The default reservation quantum, which makes native grows and shrinks touch no shared
     * counter: 1 MiB. Exact accounting (quantum 0) is opt-in.
     */
    public static final long RECOMMENDED_RESERVATION_QUANTUM_BYTES = 1L << 20;
    /** Default time {@link NativeMemoryManager#close()} waits for calls in progress: 10 s. */
    public static final long DEFAULT_CLOSE_TIMEOUT_MILLIS = 10_000L;

    private static final long NO_LIMIT = -1L;
    private static final NativeMemoryConfig DEFAULTS =
            new NativeMemoryConfig(DEFAULT_RESERVATION_BLOCK_BYTES, NO_LIMIT, DEFAULT_CLOSE_TIMEOUT_MILLIS,
                    RECOMMENDED_RESERVATION_QUANTUM_BYTES);

    private final long reservationBlockBytes;
    private final long taskLimitBytes;
    private final long closeTimeoutMillis;
    private final long reservationQuantumBytes;

    private NativeMemoryConfig(long reservationBlockBytes, long taskLimitBytes, long closeTimeoutMillis,
            long reservationQuantumBytes) {
        this.reservationBlockBytes = reservationBlockBytes;
        this.taskLimitBytes = taskLimitBytes;
        this.closeTimeoutMillis = closeTimeoutMillis;
        this.reservationQuantumBytes = reservationQuantumBytes;
    }

    /**
     * @return the defaults: 8 MiB blocks, no task limit, 10 s close timeout, the 1 MiB
     *     reservation quantum ({@link #RECOMMENDED_RESERVATION_QUANTUM_BYTES}; the fast path)
     */
    public static NativeMemoryConfig defaults() {
        return DEFAULTS;
    }

    /**
     * Sets the unit in which the manager asks the {@link ReservationListener} for memory.
     * Larger blocks mean fewer JVM calls and more memory reserved ahead of use.
     *
     * @param bytes block size in bytes, from 1 to {@link #MAX_RESERVATION_BLOCK_BYTES}
     * @return a copy with the block size set
     * @throws IllegalArgumentException if {@code bytes} is out of range
     */
    public NativeMemoryConfig withReservationBlockSize(long bytes) {
        if (bytes <= 0 || bytes > MAX_RESERVATION_BLOCK_BYTES) {
            throw new IllegalArgumentException("reservation block size must be between 1 and "
                    + MAX_RESERVATION_BLOCK_BYTES + " bytes, got " + bytes);
        }
        return new NativeMemoryConfig(bytes, taskLimitBytes, closeTimeoutMillis, reservationQuantumBytes);
    }

    /**
     * Sets an upper bound on the bytes the task may use natively, enforced by the root pool
     * whatever the listener would grant. A request beyond it (after spilling) fails with
     * {@link NativeOutOfMemoryException}.
     *
     * @param bytes the limit in bytes, {@code >= 0}
     * @return a copy with the task limit set
     * @throws IllegalArgumentException if {@code bytes} is negative
     */
    public NativeMemoryConfig withTaskLimit(long bytes) {
        if (bytes < 0) {
            throw new IllegalArgumentException("task limit must be >= 0 bytes, got " + bytes);
        }
        return new NativeMemoryConfig(reservationBlockBytes, bytes, closeTimeoutMillis, reservationQuantumBytes);
    }

    /**
     * @return a copy without a task limit (only the listener bounds the memory)
     */
    public NativeMemoryConfig withoutTaskLimit() {
        return new NativeMemoryConfig(reservationBlockBytes, NO_LIMIT, closeTimeoutMillis, reservationQuantumBytes);
    }

    /**
     * Sets how long {@link NativeMemoryManager#close()} waits for calls still running on other
     * threads before it gives up waiting (the memory is then freed when the last of those calls
     * returns, never under it).
     *
     * @param millis the timeout in milliseconds, {@code >= 0}
     * @return a copy with the close timeout set
     * @throws IllegalArgumentException if {@code millis} is negative
     */
    public NativeMemoryConfig withCloseTimeoutMillis(long millis) {
        if (millis < 0) {
            throw new IllegalArgumentException("close timeout must be >= 0 ms, got " + millis);
        }
        return new NativeMemoryConfig(reservationBlockBytes, taskLimitBytes, millis, reservationQuantumBytes);
    }

    /**
     * Sets the reservation quantum: native reservations charge their pools in multiples of it and
     * serve grows and shrinks from what they already charged, so the common grow or shrink is one
     * atomic operation on the reservation's own cache line (no pool counter, no other thread's
     * line). The bound it costs: a pool's used and peak may run ahead of what its consumers hold
     * by at most two quanta per live reservation; consumers' sizes, reports and leak reports stay
     * exact, limits hold, and the slack is taken back before a grow is refused, before operators
     * spill and when Spark asks for memory. The default is
     * {@link #RECOMMENDED_RESERVATION_QUANTUM_BYTES} (1 MiB); 0 (opt-in) is exact accounting:
     * pools' used and peak then equal what consumers hold byte for byte.
     *
     * @param bytes the quantum in bytes, from 0 to {@link #MAX_RESERVATION_QUANTUM_BYTES}
     * @return a copy with the quantum set
     * @throws IllegalArgumentException if {@code bytes} is out of range
     */
    public NativeMemoryConfig withReservationQuantum(long bytes) {
        if (bytes < 0 || bytes > MAX_RESERVATION_QUANTUM_BYTES) {
            throw new IllegalArgumentException("reservation quantum must be between 0 and "
                    + MAX_RESERVATION_QUANTUM_BYTES + " bytes, got " + bytes);
        }
        return new NativeMemoryConfig(reservationBlockBytes, taskLimitBytes, closeTimeoutMillis, bytes);
    }

    /** @return the reservation quantum in bytes (0: exact accounting) */
    public long reservationQuantum() {
        return reservationQuantumBytes;
    }

    /** @return the reservation block size in bytes */
    public long reservationBlockSize() {
        return reservationBlockBytes;
    }

    /** @return the task limit in bytes, or empty for none */
    public OptionalLong taskLimit() {
        return taskLimitBytes == NO_LIMIT ? OptionalLong.empty() : OptionalLong.of(taskLimitBytes);
    }

    /** @return the close timeout in milliseconds */
    public long closeTimeoutMillis() {
        return closeTimeoutMillis;
    }

    /** The task limit as the native library takes it: -1 for none. */
    long taskLimitOrMinusOne() {
        return taskLimitBytes;
    }

    @Override
    public boolean equals(Object o) {
        if (this == o) {
            return true;
        }
        if (!(o instanceof NativeMemoryConfig)) {
            return false;
        }
        NativeMemoryConfig other = (NativeMemoryConfig) o;
        return reservationBlockBytes == other.reservationBlockBytes
                && taskLimitBytes == other.taskLimitBytes
                && closeTimeoutMillis == other.closeTimeoutMillis
                && reservationQuantumBytes == other.reservationQuantumBytes;
    }

    @Override
    public int hashCode() {
        int h = Long.hashCode(reservationBlockBytes);
        h = 31 * h + Long.hashCode(taskLimitBytes);
        h = 31 * h + Long.hashCode(closeTimeoutMillis);
        return 31 * h + Long.hashCode(reservationQuantumBytes);
    }

    @Override
    public String toString() {
        return "NativeMemoryConfig{reservationBlockSize=" + reservationBlockBytes
                + ", taskLimit=" + (taskLimitBytes == NO_LIMIT ? "none" : Long.toString(taskLimitBytes))
                + ", closeTimeoutMillis=" + closeTimeoutMillis
                + ", reservationQuantum=" + reservationQuantumBytes + "}";
    }
}
