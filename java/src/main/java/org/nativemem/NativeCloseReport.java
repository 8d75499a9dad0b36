package org.nativemem;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

/**
 * What {@link NativeMemoryManager#close()} did, as numbers: the bytes it had to reclaim from
 * owners that did not give them back (leaks, by pool and consumer), the bytes it gave back to the
 * {@link ReservationListener}, and whether the close was deferred. The readable text
 * ({@link #text()}) is beside the numbers, for logs only: decide on the fields, never on the text.
 *
 * <p>Immutable. All sizes are in bytes.
 */
public final class NativeCloseReport {
    /** What kind of thing leaked. */
    public enum LeakKind {
        /** Native allocations never freed; the close freed them. */
        ALLOCATION,
        /** A reservation still holding bytes at close; the close released them. */
        RESERVATION,
        /** Owned native allocations still alive at close: their accounting was released; their
         *  memory is freed by their owner. */
        HELD_ALLOCATION
    }

    /** One leak: what, where, how much. */
    public static final class Leak {
        private final LeakKind kind;
        private final String consumer;
        private final String pool;
        private final long bytes;
        private final long count;

        Leak(LeakKind kind, String consumer, String pool, long bytes, long count) {
            this.kind = kind;
            this.consumer = consumer;
            this.pool = pool;
            this.bytes = bytes;
            this.count = count;
        }

        /** @return allocation or reservation */
        public LeakKind kind() {
            return kind;
        }

        /** @return the reservation's consumer ({@code name#id}), or {@code "allocations"} */
        public String consumer() {
            return consumer;
        }

        /** @return the pool's path */
        public String pool() {
            return pool;
        }

        /** @return bytes reclaimed */
        public long bytes() {
            return bytes;
        }

        /** @return number of allocations (1 for a reservation) */
        public long count() {
            return count;
        }

        @Override
        public String toString() {
            return kind + " " + consumer + " in " + pool + ": " + bytes + " bytes (" + count + ")";
        }
    }

    /** Index of each value in the {@code long[]} the native close returns. */
    private static final int DEFERRED = 0;
    private static final int IN_FLIGHT = 1;
    private static final int RETURNED = 2;
    private static final int HEADER = 3;

    private final String text;
    private final boolean deferred;
    private final long inFlightAtClose;
    private final long returnedToListenerBytes;
    private final List<Leak> leaks;

    private NativeCloseReport(String text, boolean deferred, long inFlightAtClose, long returnedToListenerBytes,
            List<Leak> leaks) {
        this.text = text;
        this.deferred = deferred;
        this.inFlightAtClose = inFlightAtClose;
        this.returnedToListenerBytes = returnedToListenerBytes;
        this.leaks = Collections.unmodifiableList(leaks);
    }

    /**
     * Decodes the native close's result: {@code text}; {@code numbers} = {deferred (0/1), calls in
     * flight, bytes returned to the listener, then per leak: bytes, count}; {@code names} = per
     * leak: kind, consumer, pool.
     */
    static NativeCloseReport fromNative(String text, long[] numbers, String[] names) {
        if (text == null || numbers == null || names == null || numbers.length < HEADER
                || (numbers.length - HEADER) % 2 != 0 || names.length != (numbers.length - HEADER) / 2 * 3) {
            throw new NativeMemoryException("native close returned a malformed report");
        }
        List<Leak> leaks = new ArrayList<Leak>();
        for (int i = 0; i < names.length / 3; i++) {
            leaks.add(new Leak(LeakKind.valueOf(names[3 * i]), names[3 * i + 1], names[3 * i + 2],
                    numbers[HEADER + 2 * i], numbers[HEADER + 2 * i + 1]));
        }
        return new NativeCloseReport(text, numbers[DEFERRED] != 0, numbers[IN_FLIGHT], numbers[RETURNED], leaks);
    }

    /** @return true if nothing leaked (and the close was not deferred) */
    public boolean isClean() {
        return !deferred && leaks.isEmpty();
    }

    /** @return true if owners left memory that the close reclaimed */
    public boolean hasLeaks() {
        return !leaks.isEmpty();
    }

    /** @return the leaks, by pool and consumer (empty if none) */
    public List<Leak> leaks() {
        return leaks;
    }

    /** @return total bytes reclaimed from leaks */
    public long leakedBytes() {
        long sum = 0;
        for (Leak l : leaks) {
            sum += l.bytes;
        }
        return sum;
    }

    /** @return bytes the close gave back to the listener (0 if deferred) */
    public long returnedToListenerBytes() {
        return returnedToListenerBytes;
    }

    /**
     * @return true if close was called from inside a call on the same manager (a listener
     *     upcall): the close runs when that call returns, and the other fields are empty
     */
    public boolean isDeferred() {
        return deferred;
    }

    /** @return calls in flight when a deferred close returned (0 otherwise) */
    public long inFlightAtClose() {
        return inFlightAtClose;
    }

    /** @return the readable report, for logs (e.g. {@code "'task-1' closed with no leaks"}) */
    public String text() {
        return text;
    }

    @Override
    public String toString() {
        return text;
    }
}
