package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import org.junit.Test;

/**
 * A manager created from Java with a reservation quantum (the fast path): reservations charge the
 * pools a quantum at a time and serve grows and shrinks from their slack; sizes and leak reports
 * stay exact; close returns everything. A {@link NativeReservation} charges its native reservation
 * in whole quanta itself (its Java-side slack: {@link JavaSlackTest}), which the native side counts
 * as held.
 */
public class ReservationQuantumTest extends NativeTestSupport {
    private static final long QUANTUM = 256 * KIB;

    private NativeMemoryManager quantumManager(String name, CountingListener listener) {
        return manager(name, listener, smallBlocks().withReservationQuantum(QUANTUM));
    }

    @Test
    public void theDefaultConfigIsTheFastPath() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("quantum-default", listener, NativeMemoryConfig.defaults());
        assertEquals(MIB, m.config().reservationQuantum());
        NativeReservation r = m.newReservation("scan", "reader", 100);
        assertEquals(100, r.size());
        assertEquals("one default quantum charged", MIB, m.usedBytes());
        // The native side sees what the Java reservation charged (its Java-side slack included).
        assertContains(m.usageReport(), "reader#1 in root/scan: used 1.0 MiB");
        r.close();
        assertEquals(0, m.usedBytes());
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void growsWithinTheSlackMakeNoListenerCallsAndSizesStayExact() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = quantumManager("quantum-1", listener);
        assertEquals(QUANTUM, m.config().reservationQuantum());
        NativeReservation r = m.newReservation("scan", "reader", 100);
        assertEquals(100, r.size());
        assertEquals("one quantum charged", QUANTUM, m.usedBytes());
        int reserves = listener.reserveCalls.get();
        for (int i = 0; i < 10_000; i++) {
            r.grow(64);
            r.shrink(64);
        }
        assertEquals(100, r.size());
        assertEquals(QUANTUM, m.usedBytes());
        assertEquals(reserves, listener.reserveCalls.get());
        assertContains(m.usageReport(), "reader#1 in root/scan: used 256.0 KiB");
        // Past the slack: the next quanta; shrinking far gives all but one quantum back.
        r.grow(3 * QUANTUM);
        assertEquals(4 * QUANTUM, m.usedBytes());
        r.shrink(3 * QUANTUM);
        // The Java reservation keeps one quantum of its slack and so does the native one below it.
        assertEquals(100 + QUANTUM, r.chargedBytes());
        assertEquals(100 + 2 * QUANTUM, m.usedBytes());
        assertTrue("pools run ahead by at most two quanta on each side",
                m.usedBytes() - r.size() <= 4 * QUANTUM);
        r.close();
        assertEquals(0, m.usedBytes());
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void sparksReclaimTakesAllButWhatJavaReservationsChargedAndCloseReportsIt() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = quantumManager("quantum-2", listener);
        NativeReservation a = m.newReservation("a", 1000);
        NativeReservation b = m.newReservation("b", 1000);
        assertEquals(2 * QUANTUM, m.usedBytes());
        long reserved = m.reservedBytes();
        // Everything but the quanta the two Java reservations charged goes back to Spark (a
        // NativeReservation's Java-side slack is its own: see its class doc).
        assertEquals(reserved - 2 * QUANTUM, m.reclaim(Long.MAX_VALUE));
        assertEquals(2 * QUANTUM, m.usedBytes());
        assertEquals(2 * QUANTUM, listener.reserved.get());
        // Still usable after the reclaim, sizes exact.
        a.grow(24);
        assertEquals(1024, a.size());
        b.close();
        m.close();
        NativeCloseReport report = m.closeReport();
        assertEquals("leaked: what a charged", QUANTUM, report.leakedBytes());
        assertEquals(0, listener.reserved.get());
    }
}
