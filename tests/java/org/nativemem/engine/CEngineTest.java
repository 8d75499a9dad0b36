package org.nativemem.engine;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;

import org.junit.After;
import org.junit.Test;
import org.nativemem.NativeCloseReport;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.ReservationListener;

/**
 * Proof 2 of the engine boundary: an engine written in C against include/nativemem.h only
 * (tests/c/engine.c, its own shared library, never linked to libnativemem_jni), driven through
 * {@link CEngine}. One scenario per test. After every step the test asserts the exact accounting:
 * the engine's pool, the manager's used and reserved bytes, and what the listener granted, against
 * {@link Expect}, a model of nativemem's documented reservation policy (deficits reserved in whole
 * blocks; a release keeps up to two blocks of cushion, above that gives back all but one). After
 * every manager close: 0 bytes left on the listener and the leaks as numbers from
 * {@link NativeMemoryManager#closeReport()} (the text is only printed).
 *
 * <p>The C-level misuse checks (forged and stale handles, bad vtables, doctored tables, foreign
 * pointers, double release, lying or failing spill callbacks, threads the JVM never saw, a lease
 * held across close) return the status codes the C code observed; the test asserts each one.
 */
public class CEngineTest {
    static final long KIB = 1L << 10;
    static final long MIB = 1L << 20;
    static final long GIB = 1L << 30;
    static final long BLOCK = MIB;

    private final List<NativeMemoryManager> managers = new ArrayList<NativeMemoryManager>();
    private final List<CEngine> engines = new ArrayList<CEngine>();

    /** A listener with a capacity that records every call (CountingListener of org.nativemem). */
    static final class Listener implements ReservationListener {
        final long capacity;
        final AtomicLong reserved = new AtomicLong();
        final AtomicLong totalReserved = new AtomicLong();
        final AtomicLong totalUnreserved = new AtomicLong();
        final AtomicInteger reserveCalls = new AtomicInteger();
        final AtomicInteger unreserveCalls = new AtomicInteger();
        final Set<Thread> threads = ConcurrentHashMap.newKeySet();

        Listener() {
            this(Long.MAX_VALUE);
        }

        Listener(long capacity) {
            this.capacity = capacity;
        }

        @Override
        public long reserve(long bytes) {
            reserveCalls.incrementAndGet();
            threads.add(Thread.currentThread());
            if (bytes <= 0) {
                throw new AssertionError("reserve(" + bytes + ")");
            }
            while (true) {
                long cur = reserved.get();
                long grant = Math.min(bytes, capacity - cur);
                if (reserved.compareAndSet(cur, cur + grant)) {
                    totalReserved.addAndGet(grant);
                    return grant;
                }
            }
        }

        @Override
        public void unreserve(long bytes) {
            unreserveCalls.incrementAndGet();
            threads.add(Thread.currentThread());
            if (bytes <= 0) {
                throw new AssertionError("unreserve(" + bytes + ")");
            }
            totalUnreserved.addAndGet(bytes);
            if (reserved.addAndGet(-bytes) < 0) {
                throw new AssertionError("unreserve(" + bytes + ") took back more than was granted");
            }
        }
    }

    /**
     * nativemem's reservation policy for one manager used from one thread: a grow not covered by
     * the cushion reserves its deficit rounded up to whole blocks (capped by the listener's
     * capacity); a release leaves a cushion of up to two blocks alone and otherwise gives back
     * all of it but one block.
     */
    static final class Expect {
        long used;
        long reserved;

        void grow(long bytes) {
            used += bytes;
            if (used > reserved) {
                reserved += (used - reserved + BLOCK - 1) / BLOCK * BLOCK;
            }
        }

        void release(long bytes) {
            used -= bytes;
            surplus();
        }

        /** A release while a spill is held for a grow or a reclaim: no hand-back. */
        void releaseHeld(long bytes) {
            used -= bytes;
        }

        void surplus() {
            if (reserved - used > 2 * BLOCK) {
                reserved = used + BLOCK;
            }
        }
    }

    @After
    public void closeEverything() {
        for (NativeMemoryManager m : managers) {
            try {
                m.close();
            } catch (RuntimeException e) {
                // the test decided how close behaves
            }
        }
        for (CEngine e : engines) {
            e.dispose();
        }
    }

    NativeMemoryManager manager(String name, Listener l) {
        // Exact accounting (quantum 0, opt-in: the default is the 1 MiB quantum): the tests pin
        // the manager's and pools' used to what the C engine holds, to the byte.
        return manager(name, l, NativeMemoryConfig.defaults().withReservationBlockSize(BLOCK).withReservationQuantum(0));
    }

    NativeMemoryManager manager(String name, Listener l, NativeMemoryConfig config) {
        NativeMemoryManager m = NativeMemoryManager.create(name, l, config);
        managers.add(m);
        return m;
    }

    CEngine engine(NativeMemoryManager m, String pool, long limit) {
        CEngine e = CEngine.open(m, pool, limit);
        engines.add(e);
        return e;
    }

    static long api() {
        return NativeMemoryManager.nativeApi();
    }

    /** Pool, manager and listener agree exactly with the model and with what the engine holds. */
    static void assertAccounting(String step, NativeMemoryManager m, Listener l, CEngine e, Expect x) {
        CEngine.Stats s = e.stats();
        assertEquals(step + ": lease for the read-out " + s, CEngine.NM_OK, s.leaseStatus);
        assertEquals(step + ": pool used " + s, x.used, s.poolUsed);
        assertEquals(step + ": manager used (engine ABI) " + s, x.used, s.managerUsed);
        assertEquals(step + ": manager used (Java)", x.used, m.usedBytes());
        assertEquals(step + ": manager reserved (engine ABI) " + s, x.reserved, s.managerReserved);
        assertEquals(step + ": manager reserved (Java)", x.reserved, m.reservedBytes());
        assertEquals(step + ": listener reserved", x.reserved, l.reserved.get());
    }

    /** After a manager's close: nothing reserved on the listener, everything granted came back. */
    static void assertAllReturned(String step, Listener l) {
        assertEquals(step + ": listener reserved after close", 0, l.reserved.get());
        assertEquals(step + ": every granted byte came back", l.totalReserved.get(), l.totalUnreserved.get());
    }

    static void assertStatus(String what, long expected, long actual) {
        assertEquals(what + ": expected " + name(expected) + ", got " + name(actual), expected, actual);
    }

    static String name(long status) {
        String[] names = {"NM_OK", "NM_ERR_INVALID_ARGUMENT", "NM_ERR_STALE_HANDLE", "NM_ERR_INVALID_HANDLE",
            "NM_ERR_CLOSED", "NM_ERR_OUT_OF_MEMORY", "NM_ERR_UNKNOWN_POINTER", "NM_ERR_LISTENER", "NM_ERR_SPILL",
            "NM_ERR_UNSUPPORTED", "NM_ERR_TIMEOUT", "NM_ERR_INTERNAL"};
        return status >= 0 && status < names.length ? names[(int) status] : "status " + status;
    }

    static CEngineException expectStatus(int status, Runnable call) {
        try {
            call.run();
        } catch (CEngineException e) {
            assertStatus("CEngineException " + e.getMessage(), status, e.status());
            return e;
        }
        fail("expected CEngineException with " + name(status));
        return null;
    }

    // ---- the engine's life ------------------------------------------------------------------------

    @Test
    public void allocateGrowPastBlocksShrinkAndCloseDropsTheEngine() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-lifecycle", l);
        CEngine e = engine(m, "engine/hash", -1);
        Expect x = new Expect();
        CEngine.Stats s = e.stats();
        assertEquals(-1, s.poolLimit);
        assertAccounting("opened", m, l, e, x);

        assertArrayEquals(new long[] {4, 4 * MIB}, e.allocate(4, MIB, 512 * KIB));
        for (int i = 0; i < 4; i++) {
            x.grow(MIB);
        }
        x.grow(512 * KIB);
        assertAccounting("4 buffers + index", m, l, e, x);
        assertEquals(4 * MIB + 512 * KIB, e.stats().heldBytes());

        // Past five reservation blocks and back.
        long before = x.used;
        CEngine.GrowShrink g = e.growShrink(5 * BLOCK, 5);
        for (int i = 0; i < 5; i++) {
            x.grow(BLOCK);
        }
        assertEquals(g.toString(), 5 * BLOCK, g.sizeAtPeak);
        assertEquals(g.toString(), before + 5 * BLOCK, g.poolUsedAtPeak);
        assertEquals(g.toString(), x.used, g.managerUsedAtPeak);
        assertEquals(g.toString(), x.reserved, g.managerReservedAtPeak);
        for (int i = 0; i < 5; i++) {
            x.release(BLOCK);
        }
        assertEquals(g.toString(), before, g.poolUsedAfter);
        assertEquals(g.toString(), before, g.managerUsedAfter);
        assertEquals(g.toString(), x.reserved, g.managerReservedAfter);
        assertAccounting("after grow/shrink", m, l, e, x);

        assertEquals(2 * MIB, e.freeBuffers(2));
        x.release(MIB);
        x.release(MIB);
        assertAccounting("2 buffers freed", m, l, e, x);
        assertEquals("2 allocations live", 2, m.stats().liveAllocations());
        assertEquals("no spill asked", 0, e.stats().spillCalls);

        m.close();
        NativeCloseReport r = m.closeReport();
        System.out.println("CEngineTest lifecycle close: " + r.text());
        assertTrue("state the drop released is no leak: " + r.text(), r.isClean());
        assertEquals(0, r.leakedBytes());
        assertAllReturned("lifecycle", l);
        s = e.stats();
        assertStatus("acquire after close", CEngine.NM_ERR_STALE_HANDLE, s.leaseStatus);
        assertEquals(s.toString(), 1, s.spillerDropped);
        assertEquals(s.toString(), 1, s.stateDropped);
        assertEquals(s.toString(), 2 * MIB + 512 * KIB, s.dropFreedBytes);
        assertEquals(s.toString(), 2, s.dropFreedBuffers);
        assertEquals(s.toString(), 0, s.dropErrors);
        assertEquals(s.toString(), 0, s.heldBytes());
        assertEquals("only Java's reference is left", 1, s.refs);
        assertStatus("shutdown after the manager's close dropped it: nothing to do", CEngine.NM_OK, e.shutdown());
    }

    @Test
    public void engineClosedBeforeItsManagerLeavesNothing() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-early-close", l);
        CEngine e = engine(m, "engine/early", -1);
        Expect x = new Expect();
        e.allocate(3, MIB, 256 * KIB);
        for (int i = 0; i < 3; i++) {
            x.grow(MIB);
        }
        x.grow(256 * KIB);
        assertAccounting("allocated", m, l, e, x);

        assertStatus("shutdown", CEngine.NM_OK, e.shutdown());
        CEngine.Stats s = e.stats();
        assertEquals(s.toString(), 1, s.spillerDropped);
        assertEquals(s.toString(), 1, s.stateDropped);
        assertEquals(s.toString(), 3 * MIB + 256 * KIB, s.dropFreedBytes);
        assertEquals(0, m.usedBytes());
        assertEquals(0, m.stats().liveAllocations());
        assertStatus("a second shutdown does nothing", CEngine.NM_OK, e.shutdown());

        m.close();
        NativeCloseReport r = m.closeReport();
        assertTrue(r.text(), r.isClean());
        assertAllReturned("early close", l);
        assertEquals("the manager's close did not drop it again", 1, e.stats().stateDropped);
    }

    @Test
    public void leakOnPurposeIsReclaimedAndReportedWithExactBytes() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-leaky", l);
        CEngine e = engine(m, "engine/leaky", -1);
        Expect x = new Expect();
        e.allocate(3, MIB, 256 * KIB);
        for (int i = 0; i < 3; i++) {
            x.grow(MIB);
        }
        x.grow(256 * KIB);
        e.leak(MIB, 2 * MIB);
        x.grow(MIB);
        x.grow(2 * MIB);
        assertAccounting("leaked", m, l, e, x);
        long usedBeforeClose = m.usedBytes();
        assertEquals("3 buffers + the forgotten allocation", 4, m.stats().liveAllocations());

        m.close();
        NativeCloseReport r = m.closeReport();
        System.out.println("CEngineTest leak close: " + r.text());
        assertTrue(r.hasLeaks());
        assertEquals("leaked bytes: the forgotten allocation + the open reservation", 3 * MIB, r.leakedBytes());
        long allocations = 0;
        long reservations = 0;
        for (NativeCloseReport.Leak leak : r.leaks()) {
            assertTrue(leak.toString(), leak.pool().contains("engine/leaky"));
            if (leak.kind() == NativeCloseReport.LeakKind.ALLOCATION) {
                assertEquals(leak.toString(), 1, leak.count());
                allocations += leak.bytes();
            } else if (leak.kind() == NativeCloseReport.LeakKind.RESERVATION) {
                assertTrue(leak.toString(), leak.consumer().startsWith("CEngine.leaked"));
                reservations += leak.bytes();
            } else {
                fail("unexpected leak " + leak);
            }
        }
        assertEquals(MIB, allocations);
        assertEquals(2 * MIB, reservations);
        assertAllReturned("leak", l);
        CEngine.Stats s = e.stats();
        assertEquals(s.toString(), 1, s.stateDropped);
        assertEquals("what the drop freed is not a leak", 3 * MIB + 256 * KIB, s.dropFreedBytes);
        assertEquals("used before close = dropped + leaked", usedBeforeClose, s.dropFreedBytes + r.leakedBytes());
        assertEquals(s.leakedAllocBytes + s.leakedReservationBytes, r.leakedBytes());
    }

    @Test
    public void embeddedManagerGivesTheLeakAsANumber() {
        String[] report = new String[1];
        long[] v = CEngine.embedded(api(), BLOCK, 3, MIB, 512 * KIB, MIB, 2 * MIB, report);
        System.out.println("CEngineTest embedded close: " + report[0]);
        Expect x = new Expect();
        for (int i = 0; i < 3; i++) {
            x.grow(MIB);
        }
        x.grow(512 * KIB);
        x.grow(MIB);
        x.grow(2 * MIB);
        assertStatus("manager_close", CEngine.NM_OK, v[0]);
        assertEquals("leaked_bytes of manager_close", 3 * MIB, v[1]);
        assertEquals("C listener reserved before close", x.reserved, v[2]);
        assertEquals("C listener reserved after close", 0, v[3]);
        assertEquals("C listener dropped once", 1, v[4]);
        assertEquals("state drop ran", 1, v[5]);
        assertEquals("spiller drop ran", 1, v[6]);
        assertEquals("the drop freed the buffers and the index", 3 * MIB + 512 * KIB, v[7]);
        assertEquals(3 * MIB + 512 * KIB, v[8]);
        // manager_create gives the default 1 MiB reservation quantum (the C header's
        // NM_DEFAULT_RESERVATION_QUANTUM): what the engine holds is exact (v[8]); the pools may run
        // ahead of it by at most two quanta per live reservation and per pool with allocations
        // (one of each here).
        assertTrue("manager used before close " + v[9] + " covers what the engine holds " + x.used, v[9] >= x.used);
        assertTrue("manager used before close " + v[9] + " within two quanta each of one reservation and"
                + " one pool's allocations of " + x.used, v[9] - x.used <= 2 * 2 * MIB);
        assertStatus("acquire after manager_close", CEngine.NM_ERR_STALE_HANDLE, v[10]);
        assertStatus("manager_close again", CEngine.NM_ERR_STALE_HANDLE, v[11]);
        assertNotNull(report[0]);
    }

    // ---- spill ------------------------------------------------------------------------------------

    @Test
    public void javaSpillReentersTheTableFromTheCallback() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-spill", l);
        CEngine e = engine(m, "engine/sort", -1);
        Expect x = new Expect();
        e.allocate(6, MIB, MIB);
        for (int i = 0; i < 6; i++) {
            x.grow(MIB);
        }
        x.grow(MIB);
        assertAccounting("allocated", m, l, e, x);
        assertEquals(7 * MIB, e.stats().heldBytes());

        // The callback frees buffers (api->free) newest first until the target is covered.
        assertEquals(3 * MIB, m.spill(2 * MIB + 512 * KIB));
        for (int i = 0; i < 3; i++) {
            x.release(MIB);
        }
        assertAccounting("spilled 3 buffers", m, l, e, x);
        CEngine.Stats s = e.stats();
        assertEquals(s.toString(), 1, s.spillCalls);
        assertEquals(s.toString(), 1, s.spills);
        assertEquals(s.toString(), 3 * MIB, s.spilledBytes);
        assertEquals(s.toString(), 1, s.managerSpillCount);
        assertEquals(s.toString(), 3 * MIB, s.managerSpilledBytes);

        // Then the index reservation is shrunk from inside the callback (reservation_shrink).
        assertEquals(4 * MIB, m.spill(100 * MIB));
        for (int i = 0; i < 3; i++) {
            x.release(MIB);
        }
        x.release(MIB);
        assertAccounting("spilled everything", m, l, e, x);
        s = e.stats();
        assertEquals(s.toString(), 0, s.heldBytes());
        assertEquals(s.toString(), 2, s.spills);
        assertEquals(s.toString(), 7 * MIB, s.spilledBytes);
        assertEquals(s.toString(), 0, s.spillErrors);
        assertEquals("nothing left to spill", 0, m.spill(MIB));
        assertEquals("a spiller with 0 spillable bytes is not asked", 2, e.stats().spillCalls);

        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("spill", l);
    }

    @Test
    public void growThatFindsNoRoomSpillsTheEngineOnTheSameThread() {
        Listener l = new Listener(8 * MIB);
        NativeMemoryManager m = manager("c-grow-spill", l);
        CEngine e = engine(m, "engine/join", -1);
        Expect x = new Expect();
        e.allocate(6, MIB, 0);
        for (int i = 0; i < 6; i++) {
            x.grow(MIB);
        }
        assertAccounting("allocated", m, l, e, x);

        // try_grow(4 MiB) inside C: Spark-like listener grants 2, nativemem spills 2 MiB of this
        // very engine (the callback runs on this thread, inside try_grow, and calls api->free).
        CEngine.GrowShrink g = e.growShrink(4 * MIB, 1);
        x.reserved = 8 * MIB;       // granted up to the capacity
        x.releaseHeld(2 * MIB);     // spilled, kept for the grow
        x.used += 4 * MIB;          // the retried grow fits
        assertEquals(g.toString(), 4 * MIB, g.sizeAtPeak);
        assertEquals(g.toString(), 8 * MIB, g.poolUsedAtPeak);
        assertEquals(g.toString(), x.reserved, g.managerReservedAtPeak);
        x.release(4 * MIB);
        assertEquals(g.toString(), x.reserved, g.managerReservedAfter);
        assertAccounting("after the grow that spilled", m, l, e, x);
        CEngine.Stats s = e.stats();
        assertEquals(s.toString(), 1, s.spills);
        assertEquals(s.toString(), 2 * MIB, s.spilledBytes);
        assertEquals(s.toString(), 4, s.buffers);

        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("grow spill", l);
    }

    @Test
    public void poolLimitSpillsTheEnginesOwnBuffers() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-pool-limit", l);
        CEngine e = engine(m, "engine/limited", 4 * MIB);
        Expect x = new Expect();
        assertEquals(4 * MIB, e.stats().poolLimit);
        assertArrayEquals(new long[] {6, 6 * MIB}, e.allocate(6, MIB, 0));
        for (int i = 0; i < 4; i++) {
            x.grow(MIB);
        }
        // The 5th and 6th allocations hit the pool's limit: each spills one older buffer.
        assertAccounting("6 allocations in a 4 MiB pool", m, l, e, x);
        CEngine.Stats s = e.stats();
        assertEquals(s.toString(), 4, s.buffers);
        assertEquals(s.toString(), 2, s.spills);
        assertEquals(s.toString(), 2 * MIB, s.spilledBytes);
        assertEquals(s.toString(), 4 * MIB, s.poolPeak);
        // A grow larger than the limit fails even after spilling everything.
        expectStatus(CEngine.NM_ERR_OUT_OF_MEMORY, () -> e.growShrink(5 * MIB, 1));
        s = e.stats();
        assertEquals(s.toString(), 0, s.poolUsed);
        assertEquals(s.toString(), 0, s.buffers);
        // (The refused grow keeps what its spill freed as cushion, beyond the two-block band: the
        // pool-limit refusal does not hand surplus back. Only agreement is asserted here.)
        assertEquals(0, m.usedBytes());
        assertEquals(m.reservedBytes(), l.reserved.get());

        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("pool limit", l);
    }

    @Test
    public void sparkStyleReclaimGivesBackExactlyWhatWasAsked() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-reclaim", l);
        CEngine e = engine(m, "engine/agg", -1);
        Expect x = new Expect();
        e.allocate(6, MIB, 0);
        for (int i = 0; i < 6; i++) {
            x.grow(MIB);
        }
        assertAccounting("allocated", m, l, e, x);

        // No cushion: the C spiller frees 3 buffers, exactly 2.5 MiB go back to the listener.
        assertEquals(2 * MIB + 512 * KIB, m.reclaim(2 * MIB + 512 * KIB));
        x.releaseHeld(3 * MIB);
        x.reserved -= 2 * MIB + 512 * KIB;
        x.surplus();
        assertAccounting("after reclaim", m, l, e, x);
        CEngine.Stats s = e.stats();
        assertEquals(s.toString(), 1, s.spills);
        assertEquals(s.toString(), 3 * MIB, s.spilledBytes);

        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("reclaim", l);
    }

    @Test
    public void spillCallbackClaimingMoreThanItHeldKeepsAccountingExact() {
        Listener l = new Listener(8 * MIB);
        NativeMemoryManager m = manager("c-liar", l);
        CEngine e = engine(m, "engine/liar", -1);
        Expect x = new Expect();
        e.allocate(8, MIB, 0);
        for (int i = 0; i < 8; i++) {
            x.grow(MIB);
        }
        assertAccounting("allocated", m, l, e, x);
        e.setSpillBehaviour(GIB, CEngine.NM_OK);

        // 1. A Java spill: the callback frees 1 MiB and claims 1 GiB more.
        long claimed = m.spill(MIB);
        x.release(MIB);
        assertAccounting("after a lying spill", m, l, e, x);
        CEngine.Stats s = e.stats();
        assertEquals("really freed", MIB, s.spilledBytes);
        System.out.println("CEngineTest liar: spill() returned " + claimed + ", manager spilledBytes "
                + s.managerSpilledBytes + " (the callback really freed " + s.spilledBytes + ")");

        // 2. Spark's reclaim returns exactly what reached the listener, not the claim.
        assertEquals(3 * MIB, m.reclaim(3 * MIB));
        x.reserved -= MIB;          // phase 1: the 1 MiB cushion
        x.releaseHeld(2 * MIB);     // phase 2: two buffers, claimed 2 MiB + 1 GiB
        x.reserved -= 2 * MIB;
        x.surplus();
        assertAccounting("after a lying reclaim", m, l, e, x);

        // 3. A grow the spill cannot cover fails although the callback claims 1 GiB; nothing is
        // counted that was not released.
        expectStatus(CEngine.NM_ERR_OUT_OF_MEMORY, () -> e.growShrink(20 * MIB, 1));
        x.reserved = 8 * MIB;       // the listener granted up to its capacity
        x.releaseHeld(5 * MIB);     // every buffer spilled, 5 MiB + 1 GiB claimed
        x.surplus();                // the refused grow hands the surplus back
        assertAccounting("after a refused grow", m, l, e, x);
        s = e.stats();
        assertEquals(s.toString(), 0, s.heldBytes());
        assertEquals(s.toString(), 8 * MIB, s.spilledBytes);

        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("liar", l);
    }

    @Test
    public void failingSpillCallbackFailsTheRequestAndChangesNothing() {
        Listener l = new Listener(4 * MIB);
        NativeMemoryManager m = manager("c-failing-spill", l);
        CEngine e = engine(m, "engine/failing", -1);
        Expect x = new Expect();
        e.allocate(4, MIB, 0);
        for (int i = 0; i < 4; i++) {
            x.grow(MIB);
        }
        e.setSpillBehaviour(0, CEngine.NM_ERR_INTERNAL);
        expectStatus(CEngine.NM_ERR_SPILL, () -> e.growShrink(MIB, 1));
        assertAccounting("after the failed spill", m, l, e, x);
        try {
            m.spill(MIB);
            fail("a failing spill callback must fail Java's spill");
        } catch (NativeMemoryException expected) {
            assertTrue(expected.getMessage(), expected.getMessage().contains("CEngine"));
        }
        assertAccounting("after the failed Java spill", m, l, e, x);
        assertEquals(4, e.stats().buffers);

        e.setSpillBehaviour(0, CEngine.NM_OK);
        CEngine.GrowShrink g = e.growShrink(MIB, 1);
        assertEquals(g.toString(), 4 * MIB, g.poolUsedAtPeak);
        x.releaseHeld(MIB);
        x.used += MIB;
        x.release(MIB);
        assertAccounting("the same grow after the callback recovered", m, l, e, x);

        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("failing spill", l);
    }

    // ---- threads ----------------------------------------------------------------------------------

    @Test
    public void pthreadsTheJvmNeverSawGrowAndSpillConcurrently() {
        Listener l = new Listener(16 * MIB);
        NativeMemoryManager m = manager("c-threads", l);
        CEngine e = engine(m, "engine/threads", -1);
        e.allocate(4, MIB, 0);
        CEngine.ThreadsResult t = e.runThreads(4, 400, 512 * KIB, MIB);
        System.out.println("CEngineTest threads: " + t + ", " + e.stats());
        assertEquals(t.toString(), 0, t.errors);
        assertTrue(t.toString(), t.grows > 0);
        assertTrue(t.toString(), t.buffers > 16);
        CEngine.Stats s = e.stats();
        assertTrue("grows of some threads spilled buffers of others: " + s, s.spills > 0);
        assertEquals(s.toString(), 0, s.spillErrors);
        // No call in flight: the pool holds exactly the engine's buffers, nothing else.
        assertEquals(s.toString(), s.heldBytes(), s.poolUsed);
        assertEquals(s.toString(), s.poolUsed, m.usedBytes());
        assertEquals(m.reservedBytes(), l.reserved.get());
        assertTrue(m.reservedBytes() <= 16 * MIB);
        boolean foreign = false;
        for (Thread th : l.threads) {
            foreign |= th != Thread.currentThread();
        }
        assertTrue("the listener was called from the C threads: " + l.threads, foreign);

        long held = s.heldBytes();
        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertEquals(held, e.stats().dropFreedBytes);
        assertAllReturned("threads", l);
    }

    @Test
    public void leaseHeldAtCloseMakesCloseTimeOutThenFreesWhenReleased() {
        Listener l = new Listener();
        long timeout = 300;
        NativeMemoryManager m = manager("c-held-lease", l, NativeMemoryConfig.defaults()
                .withReservationBlockSize(BLOCK).withReservationQuantum(0).withCloseTimeoutMillis(timeout));
        CEngine e = engine(m, "engine/held", -1);
        Expect x = new Expect();
        e.allocate(2, MIB, 0);
        x.grow(MIB);
        x.grow(MIB);
        CEngine.LeaseHolder holder = e.holdLease(MIB);
        x.grow(MIB);
        assertAccounting("a C thread holds a lease and 1 MiB", m, l, e, x);

        long t0 = System.nanoTime();
        try {
            m.close();
            fail("close must report that a lease was still held");
        } catch (NativeMemoryException expected) {
            System.out.println("CEngineTest held lease: close threw " + expected.getMessage());
            assertTrue(expected.getMessage(), expected.getMessage().contains("timed out"));
        }
        long waitedMillis = (System.nanoTime() - t0) / 1_000_000;
        assertTrue("close waited its timeout: " + waitedMillis + " ms", waitedMillis >= timeout);
        assertTrue("and not much longer: " + waitedMillis + " ms", waitedMillis < timeout + 5_000);
        assertTrue(m.isClosed());
        assertNull(m.closeReport());
        assertEquals("nothing freed under the holder", x.reserved, l.reserved.get());
        CEngine.Stats s = e.stats();
        assertStatus("no new lease once closing", CEngine.NM_ERR_STALE_HANDLE, s.leaseStatus);
        assertEquals("drop not run yet", 0, s.stateDropped);
        assertEquals(2, s.buffers);

        long[] h = holder.release();
        assertStatus("holder acquire", CEngine.NM_OK, h[0]);
        assertStatus("holder allocate", CEngine.NM_OK, h[1]);
        assertEquals("its memory intact after close returned", 1, h[2]);
        assertStatus("allocate while closing", CEngine.NM_ERR_CLOSED, h[3]);
        // A held lease keeps the manager from being freed, not from closing: new work on it is
        // refused like on any other handle of a closing manager.
        assertStatus("manager_stats on its lease while closing", CEngine.NM_ERR_CLOSED, h[4]);
        assertEquals("no stats written when refused", 0, h[5]);
        // Giving back is let in while the close still waits for this lease (no leak to report).
        assertStatus("free while closing", CEngine.NM_OK, h[6]);
        assertEquals("freed, so not checked again", 0, h[7]);
        assertStatus("release of the last lease", CEngine.NM_OK, h[8]);
        assertEquals("drop not run before the release", 0, h[9]);
        assertEquals("drop ran during the release", 1, h[10]);
        assertEquals("the deferred close ran on the holder's thread", 1, h[11]);
        assertAllReturned("held lease", l);
        s = e.stats();
        assertEquals(s.toString(), 2 * MIB, s.dropFreedBytes);
        assertEquals(s.toString(), 1, s.spillerDropped);
    }

    // ---- misuse at the C level ----------------------------------------------------------------------

    @Test
    public void everyHandleIsStaleAfterTheManagerClosed() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-stale", l);
        CEngine e = engine(m, "engine/stale", -1);
        e.allocate(1, MIB, 0);
        e.leak(64 * KIB, 64 * KIB);
        long handle = m.handle();
        m.close();
        assertEquals(128 * KIB, m.closeReport().leakedBytes());
        assertAllReturned("stale", l);
        long[] v = e.staleProbe();
        String[] what = {"acquire(manager)", "pool_stats", "allocate", "free(leaked pointer)",
            "reservation_try_grow(leaked)", "reservation_close(leaked)", "spiller_unregister", "detach",
            "pool_close", "manager_stats(released lease)", "release(released lease)"};
        for (int i = 0; i < what.length; i++) {
            assertStatus(what[i], CEngine.NM_ERR_STALE_HANDLE, v[i]);
        }
        assertEquals("state dropped once", 1, v[11]);
        assertEquals("spiller dropped once", 1, v[12]);
        expectStatus(CEngine.NM_ERR_STALE_HANDLE, () -> CEngine.open(api(), handle, "engine/again", -1));
        assertEquals(0, l.reserved.get());
    }

    @Test
    public void forgedHandlesAndBadArgumentsAreRefused() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-forged", l);
        long[] v = CEngine.forged(api(), m.handle());
        String[] what = {"acquire(0)", "acquire(0x1234)", "acquire(UINT64_MAX)", "acquire(unissued generation)",
            "pool_stats(0x1234)", "pool_stats(manager handle)", "reservation_try_grow(0)", "free(pool 0x1234)",
            "spiller_unregister(0x1234)", "detach(0x1234)", "release(0x1234)", "manager_stats(manager handle)"};
        for (int i = 0; i < what.length; i++) {
            assertStatus(what[i], CEngine.NM_ERR_INVALID_HANDLE, v[i]);
        }
        assertStatus("acquire with NULL out", CEngine.NM_ERR_INVALID_ARGUMENT, v[12]);
        assertStatus("acquire(0x1234) with err NULL", CEngine.NM_ERR_INVALID_HANDLE, v[13]);
        assertEquals("success sets *err to NULL", 1, v[14]);
        assertStatus("pool_open(NULL path)", CEngine.NM_ERR_INVALID_ARGUMENT, v[15]);
        assertStatus("pool_open(empty element)", CEngine.NM_ERR_INVALID_ARGUMENT, v[16]);
        assertStatus("pool_open(limit -2)", CEngine.NM_ERR_INVALID_ARGUMENT, v[17]);
        assertStatus("allocate(0 bytes)", CEngine.NM_ERR_INVALID_ARGUMENT, v[18]);
        assertEquals("a failed allocate sets *out to NULL", 1, v[19]);
        assertStatus("allocate(align 3)", CEngine.NM_ERR_INVALID_ARGUMENT, v[20]);
        assertStatus("reservation_shrink past its size", CEngine.NM_ERR_INVALID_ARGUMENT, v[21]);
        assertStatus("reservation_try_grow(pool handle)", CEngine.NM_ERR_INVALID_HANDLE, v[22]);
        assertEquals("every failure with err gave a message (freed)", 20, v[23]);
        assertEquals(0, m.usedBytes());
        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("forged", l);
        expectStatus(CEngine.NM_ERR_UNSUPPORTED, () -> CEngine.open(0, 1, "x", -1));
    }

    @Test
    public void apiCheckRefusesAnOlderOrSmallerTable() {
        assertArrayEquals("real, NULL, abi_version 0, struct_size - 8, struct_size 0, newer version, larger table",
                new long[] {CEngine.NM_OK, CEngine.NM_ERR_UNSUPPORTED, CEngine.NM_ERR_UNSUPPORTED,
                    CEngine.NM_ERR_UNSUPPORTED, CEngine.NM_ERR_UNSUPPORTED, CEngine.NM_OK, CEngine.NM_OK},
                CEngine.apiCheck(api()));
    }

    @Test
    public void badSpillerVtablesAreRefusedAndTheirCtxStaysTheCallers() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-vtable", l);
        long[] v = CEngine.vtableChecks(api(), m.handle());
        String[] what = {"struct_size - 8", "struct_size 0", "spill NULL", "spillable_bytes NULL", "vtable NULL",
            "name NULL"};
        for (int i = 0; i < what.length; i++) {
            assertStatus(what[i], CEngine.NM_ERR_INVALID_ARGUMENT, v[i]);
        }
        assertEquals("no drop(ctx) after a refused registration", 0, v[6]);
        assertStatus("a larger vtable (newer header) is accepted", CEngine.NM_OK, v[7]);
        assertEquals("drop(ctx) once after unregister", 1, v[8]);
        assertStatus("unregister again", CEngine.NM_ERR_STALE_HANDLE, v[9]);
        assertEquals("and no second drop", 1, v[10]);
        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("vtable", l);
    }

    @Test
    public void leaseReleasedTwiceIsStale() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-release-twice", l);
        assertArrayEquals("acquire, release, release again, manager_stats on it",
                new long[] {CEngine.NM_OK, CEngine.NM_OK, CEngine.NM_ERR_STALE_HANDLE, CEngine.NM_ERR_STALE_HANDLE},
                CEngine.releaseTwice(api(), m.handle()));
        long t0 = System.nanoTime();
        m.close();
        assertTrue("the released lease does not hold up close", System.nanoTime() - t0 < 5_000_000_000L);
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("release twice", l);
    }

    @Test
    public void foreignInteriorNullAndFreedPointersAreRefused() {
        Listener l = new Listener();
        NativeMemoryManager m = manager("c-foreign", l);
        NativeMemoryManager other = manager("c-foreign-other", new Listener());
        CEngine e = engine(m, "engine/foreign", -1);
        CEngine o = engine(other, "engine/other", -1);
        e.allocate(1, MIB, 0);
        long[] v = e.foreignFree();
        assertStatus("free(malloc'd pointer)", CEngine.NM_ERR_UNKNOWN_POINTER, v[0]);
        assertEquals("the malloc'd memory untouched (then freed with free())", 1, v[1]);
        assertEquals("pool used before", MIB, v[2]);
        assertEquals("the refusals changed nothing (the real allocation is live)", MIB + 8192, v[3]);
        assertStatus("free(interior pointer)", CEngine.NM_ERR_UNKNOWN_POINTER, v[4]);
        assertStatus("free(NULL)", CEngine.NM_ERR_INVALID_ARGUMENT, v[5]);
        assertStatus("free(the allocation)", CEngine.NM_OK, v[6]);
        assertStatus("free(it again)", CEngine.NM_ERR_UNKNOWN_POINTER, v[7]);
        assertEquals("pool used after", MIB, v[8]);
        assertArrayEquals("freed through another manager's pool, then its own",
                new long[] {CEngine.NM_ERR_UNKNOWN_POINTER, CEngine.NM_OK}, e.crossFree(o));
        assertEquals(MIB, m.usedBytes());
        assertEquals(0, other.usedBytes());
        m.close();
        assertTrue(m.closeReport().text(), m.closeReport().isClean());
        assertAllReturned("foreign", l);
    }

    // ---- forced charges: a C malloc hook (reservation_force_grow / reservation_force_shrink) -----------

    @Test
    public void aMallocHookChargesThePoolWithoutAskingTheListenerAndTheNextGrowPaysTheOvercommit() {
        Listener l = new Listener(8 * BLOCK);
        NativeMemoryManager m = manager("c-hook", l);
        long h = CEngine.openUntracked(m, 4 * MIB, 12 * BLOCK);
        try {
            long[] st = CEngine.untrackedStats(h);
            assertEquals(4 * MIB, st[0]);
            assertEquals(12 * BLOCK, st[1]);
            assertEquals("all of it over-committed: nothing was reserved", 12 * BLOCK, st[2]);
            assertTrue("batched per MiB: " + st[3], st[3] >= 1 && st[3] <= 12 * BLOCK / MIB);
            assertEquals(12 * BLOCK, st[4]);
            assertEquals("the listener was never called", 0, l.reserveCalls.get());
            assertEquals(12 * BLOCK, m.usedBytes());
            assertEquals(12 * BLOCK, m.stats().overcommittedBytes());
            assertEquals(12 * BLOCK, m.stats().overcommittedTotalBytes());
            assertTrue(m.usageReport(), m.usageReport().contains("Over-committed"));
            // The next fallible grow must reserve the over-commit too: more than the listener has.
            try {
                m.newReservation("operator", KIB).close();
                fail("a grow over un-payable over-commit succeeded");
            } catch (NativeMemoryException e) {
                assertTrue(e.getMessage(), e.getMessage().contains("Over-committed"));
            }
        } finally {
            long[] done = CEngine.closeUntracked(h);
            assertEquals(12 * BLOCK, done[0]);
            assertEquals(0, done[2]);
        }
        assertEquals(0, m.usedBytes());
        assertEquals(0, m.stats().overcommittedBytes());
        assertEquals(12 * BLOCK, m.stats().overcommitPeakBytes());
        m.newReservation("operator", KIB).close();
        m.close();
        assertEquals(0, l.reserved.get());
    }

    @Test
    public void coverOvercommitReservesWhatAHookForcedPastTheTaskLimitFromTheListenerAtOnce() {
        Listener l = new Listener(64 * BLOCK);
        NativeMemoryManager m = manager("c-cover", l, NativeMemoryConfig.defaults()
                .withReservationBlockSize(BLOCK).withReservationQuantum(0).withTaskLimit(4 * BLOCK));
        assertEquals("nothing over-committed: nothing granted", 0, CEngine.coverOvercommit(m));
        assertEquals("and the listener not called", 0, l.reserveCalls.get());
        long h = CEngine.openUntracked(m, 0, 12 * BLOCK);
        try {
            assertEquals("forced past the 4-block limit, Spark not asked", 12 * BLOCK, CEngine.untrackedStats(h)[2]);
            assertEquals(0, l.reserved.get());
            assertEquals(12 * BLOCK, CEngine.coverOvercommit(m));
            assertEquals("Spark holds what the task uses", 12 * BLOCK, l.reserved.get());
            assertEquals(12 * BLOCK, m.usedBytes());
            assertEquals(0, m.stats().overcommittedBytes());
            assertEquals(12 * BLOCK, m.stats().overcommittedTotalBytes());
            assertEquals("covered: nothing left", 0, CEngine.coverOvercommit(m));
        } finally {
            CEngine.closeUntracked(h);
        }
        assertEquals(0, m.usedBytes());
        long handle = m.handle();
        m.close();
        assertEquals(0, l.reserved.get());
        expectStatus(CEngine.NM_ERR_STALE_HANDLE, () -> CEngine.coverOvercommit(handle));
    }
}
