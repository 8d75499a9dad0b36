package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotEquals;
import static org.junit.Assert.assertNotSame;
import static org.junit.Assert.assertSame;

import java.util.OptionalLong;
import org.junit.Test;

/** The immutable config: defaults, copies, validation. Pure Java. */
public class NativeMemoryConfigTest {

    @Test
    public void defaults() {
        NativeMemoryConfig d = NativeMemoryConfig.defaults();
        assertSame(d, NativeMemoryConfig.defaults());
        assertEquals(8L << 20, d.reservationBlockSize());
        assertEquals(OptionalLong.empty(), d.taskLimit());
        assertEquals(10_000L, d.closeTimeoutMillis());
        // The fast path is the default; exact accounting (0) is opt-in.
        assertEquals(NativeMemoryConfig.RECOMMENDED_RESERVATION_QUANTUM_BYTES, d.reservationQuantum());
        assertEquals(1L << 20, d.reservationQuantum());
        assertEquals("NativeMemoryConfig{reservationBlockSize=8388608, taskLimit=none, closeTimeoutMillis=10000,"
                + " reservationQuantum=1048576}", d.toString());
        assertEquals(0L, d.withReservationQuantum(0).reservationQuantum());
    }

    @Test
    public void withersReturnCopiesAndLeaveTheOriginal() {
        NativeMemoryConfig d = NativeMemoryConfig.defaults();
        NativeMemoryConfig c = d.withReservationBlockSize(1 << 20).withTaskLimit(1L << 30).withCloseTimeoutMillis(5);
        assertNotSame(d, c);
        assertEquals(8L << 20, d.reservationBlockSize());
        assertFalse(d.taskLimit().isPresent());
        assertEquals(1 << 20, c.reservationBlockSize());
        assertEquals(OptionalLong.of(1L << 30), c.taskLimit());
        assertEquals(5, c.closeTimeoutMillis());
        assertEquals(OptionalLong.of(0), d.withTaskLimit(0).taskLimit());
        assertEquals(OptionalLong.empty(), c.withoutTaskLimit().taskLimit());
        assertEquals(1L << 62, d.withReservationBlockSize(1L << 62).reservationBlockSize());
        NativeMemoryConfig q = c.withReservationQuantum(0);
        assertEquals(0L, q.reservationQuantum());
        assertEquals(1L << 20, c.reservationQuantum());
        assertEquals(0L, q.withTaskLimit(5).reservationQuantum()); // kept by every wither
        assertEquals(1L << 40, d.withReservationQuantum(1L << 40).reservationQuantum());
        assertNotEquals(c, q);
    }

    @Test
    public void equalityIsByValue() {
        NativeMemoryConfig a = NativeMemoryConfig.defaults().withTaskLimit(100);
        NativeMemoryConfig b = NativeMemoryConfig.defaults().withTaskLimit(100);
        assertEquals(a, b);
        assertEquals(a.hashCode(), b.hashCode());
        assertNotEquals(a, b.withTaskLimit(101));
        assertNotEquals(a, a.withoutTaskLimit());
        assertEquals(NativeMemoryConfig.defaults(), a.withoutTaskLimit());
    }

    @Test
    public void invalidValuesAreRefused() {
        NativeMemoryConfig d = NativeMemoryConfig.defaults();
        String[][] cases = {
            {"0", "reservation block size must be between 1 and 4611686018427387904 bytes, got 0"},
            {"-1", "reservation block size must be between 1 and 4611686018427387904 bytes, got -1"},
        };
        for (String[] c : cases) {
            try {
                d.withReservationBlockSize(Long.parseLong(c[0]));
                throw new AssertionError("accepted block " + c[0]);
            } catch (IllegalArgumentException e) {
                assertEquals(c[1], e.getMessage());
            }
        }
        try {
            d.withTaskLimit(-1);
            throw new AssertionError("accepted task limit -1");
        } catch (IllegalArgumentException e) {
            assertEquals("task limit must be >= 0 bytes, got -1", e.getMessage());
        }
        for (long bad : new long[] {-1, (1L << 40) + 1}) {
            try {
                d.withReservationQuantum(bad);
                throw new AssertionError("accepted quantum " + bad);
            } catch (IllegalArgumentException e) {
                assertEquals("reservation quantum must be between 0 and 1099511627776 bytes, got " + bad,
                        e.getMessage());
            }
        }
        try {
            d.withCloseTimeoutMillis(Long.MIN_VALUE);
            throw new AssertionError("accepted timeout");
        } catch (IllegalArgumentException e) {
            assertEquals("close timeout must be >= 0 ms, got " + Long.MIN_VALUE, e.getMessage());
        }
    }
}
