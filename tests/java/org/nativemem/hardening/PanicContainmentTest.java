package org.nativemem.hardening;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import org.junit.Test;
import org.nativemem.NativeMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeMemoryStats;
import org.nativemem.NativeReservation;

/**
 * A Rust panic in each layer becomes a {@link NativeMemoryException} whose message carries the
 * panic text, and the JVM and the library carry on (a fresh manager works):
 *
 * <ul>
 *   <li>the export body: {@code org.nativemem.PanicTest};
 *   <li>a native spiller called from a Java-initiated spill ({@code spill}) and on the path Spark
 *       takes ({@code reclaim}; the real Spark run is in {@code soak.FaultSoakJob});
 *   <li>a native spiller called by the core inside a grow that spills (the panic unwinds through
 *       the core's grow and spill code);
 *   <li>the listener's upcall path (a Rust listener in front of the Java one): in reserve, in
 *       unreserve, and in unreserve during close.
 * </ul>
 *
 * <p>The {@code ...KeepsAccountingExact} tests also require that the manager is exact afterwards:
 * used is what its owners hold, reserved is what the listener granted and did not get back, the
 * component that panicked is used again, and close gives every byte back. (The core catches
 * a panic at each call-out to a listener or spiller and undoes its bookkeeping as for any error.)
 */
public class PanicContainmentTest extends HardeningSupport {
    // ---- a native spiller, asked by Java ----------------------------------------------------------

    @Test
    public void spillerPanicOnAJavaSpillIsContained() {
        Budget listener = new Budget();
        NativeMemoryManager m = manager("spill-panics", listener);
        javaSpillPanics(m, listener);
        m.close();
        assertEquals(0, listener.reserved.get());
        freshManagerWorks("a spiller panic on a Java spill");
    }

    @Test
    public void spillerPanicOnAJavaSpillKeepsAccountingExact() {
        Budget listener = new Budget();
        NativeMemoryManager m = manager("spill-panics-exact", listener);
        javaSpillPanics(m, listener);
        assertEquals("the spiller is asked again (not left marked as spilling)", 2 * MIB, m.spill(2 * MIB));
        assertEquals(4 * MIB, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
        m.close();
        assertEquals("'spill-panics-exact' closed with no leaks", m.closeReport().text());
        assertEquals(0, listener.reserved.get());
    }

    private static void javaSpillPanics(NativeMemoryManager m, Budget listener) {
        Internals.registerPanickingSpiller(m.handle(), "op/sort", 6 * MIB, 1, "sort spill bug");
        assertEquals(6 * MIB, m.usedBytes());
        NativeMemoryException e = expect(NativeMemoryException.class, () -> m.spill(2 * MIB));
        assertContains(e.getMessage(), "sort spill bug (spill call 1, target 2097152 bytes)");
        assertEquals("nothing was freed", 6 * MIB, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
    }

    // ---- a native spiller, asked the way Spark asks --------------------------------------------

    @Test
    public void spillerPanicOnReclaimIsContained() {
        Budget listener = new Budget();
        NativeMemoryManager m = manager("spark-spill-panics", listener);
        NativeReservation r = reclaimPanics(m, listener);
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
        freshManagerWorks("a spiller panic on reclaim");
    }

    @Test
    public void spillerPanicOnReclaimKeepsAccountingExact() {
        Budget listener = new Budget();
        NativeMemoryManager m = manager("spark-spill-panics-exact", listener);
        NativeReservation r = reclaimPanics(m, listener);
        assertEquals("the spiller is asked again", 3 * MIB, m.reclaim(3 * MIB));
        assertEquals(4 * MIB, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    private static NativeReservation reclaimPanics(NativeMemoryManager m, Budget listener) {
        Internals.registerPanickingSpiller(m.handle(), "op/sort", 6 * MIB, 1, "spill bug under Spark");
        NativeReservation r = m.newReservation("java", 3 * MIB);
        r.shrink(2 * MIB); // leaves a 2 MiB cushion, given back before any spiller is asked
        long reservedBefore = m.reservedBytes();
        assertEquals(2 * MIB, reservedBefore - m.usedBytes());
        NativeMemoryException e = expect(NativeMemoryException.class, () -> m.reclaim(5 * MIB));
        assertContains(e.getMessage(), "spill bug under Spark (spill call 1");
        assertEquals("the cushion went back before the spiller panicked", reservedBefore - 2 * MIB,
                m.reservedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
        assertEquals(7 * MIB, m.usedBytes());
        return r;
    }

    // ---- a native spiller, asked by the core inside a grow -------------------------------------

    @Test
    public void spillerPanicInsideAGrowThatSpillsIsContained() {
        Budget listener = new Budget(8 * MIB);
        NativeMemoryManager m = manager("grow-spill-panics", listener);
        NativeReservation r = growSpillPanics(m, listener);
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
        freshManagerWorks("a spiller panic inside a grow");
    }

    @Test
    public void spillerPanicInsideAGrowThatSpillsKeepsAccountingExact() {
        Budget listener = new Budget(8 * MIB);
        NativeMemoryManager m = manager("grow-spill-panics-exact", listener);
        NativeReservation r = growSpillPanics(m, listener);
        r.grow(3 * MIB); // the spiller frees 2 MiB this time
        assertEquals(4 * MIB, r.size());
        assertEquals(8 * MIB, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
        // Hysteresis works as before the panic: surplus above two blocks goes back on a shrink.
        r.shrink(4 * MIB);
        assertEquals(4 * MIB, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
        long cushion = m.reservedBytes() - m.usedBytes();
        assertTrue("at most two blocks of cushion after a shrink, got " + cushion, cushion <= 2 * BLOCK);
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    private static NativeReservation growSpillPanics(NativeMemoryManager m, Budget listener) {
        Internals.registerPanickingSpiller(m.handle(), "op/sort", 6 * MIB, 1, "spill bug under a grow");
        NativeReservation r = m.newReservation("java", MIB);
        assertEquals(7 * MIB, m.reservedBytes());
        // The listener grants 1 of the 3 MiB needed: the core spills, and the spiller panics.
        NativeMemoryException e = expect(NativeMemoryException.class, () -> r.grow(3 * MIB));
        assertContains(e.getMessage(), "spill bug under a grow (spill call 1");
        assertEquals("the failed grow left nothing charged", MIB, r.size());
        assertEquals(7 * MIB, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
        return r;
    }

    // ---- the listener's upcall path ---------------------------------------------------------

    @Test
    public void listenerPanicInReserveIsContained() {
        NativeReservation r = reservePanics(panicky("reserve-panics", new Budget(), 2, 0, "listener bug"));
        assertEquals(MIB, r.size());
        freshManagerWorks("a listener panic in reserve");
    }

    @Test
    public void listenerPanicInReserveKeepsAccountingExact() {
        Budget listener = new Budget();
        NativeMemoryManager m = panicky("reserve-panics-exact", listener, 2, 0, "listener bug");
        NativeReservation r = reservePanics(m);
        assertEquals("the failed grow left nothing charged", MIB, m.usedBytes());
        assertEquals(MIB, m.reservedBytes());
        assertEquals(MIB, listener.reserved.get());
        r.grow(2 * MIB);
        assertEquals(3 * MIB, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
        r.close();
        m.close();
        assertEquals("'reserve-panics-exact' closed with no leaks", m.closeReport().text());
        assertEquals(0, listener.reserved.get());
    }

    private static NativeReservation reservePanics(NativeMemoryManager m) {
        NativeReservation r = m.newReservation("p", MIB);
        NativeMemoryException e = expect(NativeMemoryException.class, () -> r.grow(2 * MIB));
        assertContains(e.getMessage(), "listener bug (reserve call 2, 2097152 bytes)");
        assertEquals(MIB, r.size());
        return r;
    }

    @Test
    public void listenerPanicInUnreserveIsContained() {
        Budget listener = new Budget();
        NativeReservation r = unreservePanics(panicky("unreserve-panics", listener, 0, 1, "listener bug"), listener);
        assertEquals("the reservation did shrink", MIB, r.size());
        freshManagerWorks("a listener panic in unreserve");
    }

    @Test
    public void listenerPanicInUnreserveKeepsAccountingExact() {
        Budget listener = new Budget();
        NativeMemoryManager m = panicky("unreserve-panics-exact", listener, 0, 1, "listener bug");
        NativeReservation r = unreservePanics(m, listener);
        assertEquals(MIB, m.usedBytes());
        NativeMemoryStats before = m.stats();
        r.grow(3 * MIB); // from the cushion: no listener call
        assertEquals(before.reserveCalls(), m.stats().reserveCalls());
        assertEquals(4 * MIB, m.usedBytes());
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    private static NativeReservation unreservePanics(NativeMemoryManager m, Budget listener) {
        NativeReservation r = m.newReservation("p", 5 * MIB);
        // 4 MiB of cushion is more than two blocks: 3 MiB go back, and that upcall panics.
        NativeMemoryException e = expect(NativeMemoryException.class, () -> r.shrink(4 * MIB));
        assertContains(e.getMessage(), "listener bug (unreserve call 1, 3145728 bytes)");
        assertEquals("the bytes stay reserved", 5 * MIB, m.reservedBytes());
        assertEquals(5 * MIB, listener.reserved.get());
        return r;
    }

    @Test
    public void listenerPanicInUnreserveDuringCloseIsContained() {
        Budget listener = new Budget();
        NativeMemoryManager m = panicky("close-panics", listener, 0, 1, "listener bug at close");
        NativeReservation r = m.newReservation("p", MIB);
        r.close(); // an open one outlives the close today: see ...DuringCloseLeavesNoHandle
        NativeMemoryException e = expect(NativeMemoryException.class, m::close);
        assertContains(e.getMessage(), "listener bug at close (unreserve call 1, 1048576 bytes)");
        assertTrue(m.isClosed());
        expect(IllegalStateException.class, r::size);
        expect(IllegalStateException.class, () -> Internals.nativeGrow(Internals.handleOf(r), 1));
        // As when the listener throws at close: it keeps the bytes it never got back.
        assertEquals(MIB, listener.reserved.get());
        freshManagerWorks("a listener panic during close");
    }

    /**
     * A reservation left open for the close to release: its handle must not outlive the close
     * (the @After check of this class counts live handles).
     */
    @Test
    public void listenerPanicInUnreserveDuringCloseLeavesNoHandle() {
        Budget listener = new Budget();
        NativeMemoryManager m = panicky("close-panics-handles", listener, 0, 1, "listener bug at close");
        NativeReservation r = m.newReservation("p", MIB);
        expect(NativeMemoryException.class, m::close);
        expect(IllegalStateException.class, () -> Internals.nativeGrow(Internals.handleOf(r), 1));
        assertEquals(MIB, listener.reserved.get());
    }

    private NativeMemoryManager panicky(String name, Budget listener, int reserveCall, int unreserveCall,
            String message) {
        long handle = Internals.createPanickyManager(name, listener, BLOCK, reserveCall, unreserveCall, message);
        return track(Internals.wrap(handle, name, smallBlocks()));
    }
}
