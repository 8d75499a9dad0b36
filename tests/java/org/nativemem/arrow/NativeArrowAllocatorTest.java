package org.nativemem.arrow;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import org.apache.arrow.memory.ArrowBuf;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.vector.IntVector;
import org.junit.Test;
import org.nativemem.NativeCloseReport;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;

/** {@link NativeArrowAllocator}: close order with the manager, leaks freed and reported. */
public class NativeArrowAllocatorTest extends ArrowTestSupport {

    @Test
    public void allocatorCloseThenManagerCloseLeavesZeroEverywhere() {
        Budget budget = new Budget(Long.MAX_VALUE);
        NativeMemoryManager mm = manager("order", budget, NativeMemoryConfig.defaults().withReservationBlockSize(MIB));
        NativeArrowAllocator a = NativeArrowAllocator.create(mm, "order", "arrow", MIB);
        assertTrue("the tracking allocation manager is in use", a.freesLeakedMemory());
        IntVector v = new IntVector("v", a.allocator());
        v.allocateNew(1_000_000);
        assertTrue(budget.held.get() >= 4 * MIB);
        assertAccounting("4 MB vector", a, mm, 0);
        assertEquals(a.allocator().getAllocatedMemory(), a.allocatedBytes());
        v.close();
        assertEquals("the vector's memory was freed", 0, a.liveAllocations());
        a.close();
        a.close(); // idempotent
        assertFalse(a.closeReport().hasLeaks());
        assertEquals(0, a.allocatedBytes());
        assertEquals("the arrow pool is empty", 0, mm.usedBytes());
        mm.close();
        NativeCloseReport r = mm.closeReport();
        assertNotNull(r);
        assertTrue(r.text(), r.isClean() || !r.hasLeaks());
        assertEquals("every byte back in the budget", 0, budget.held.get());
        try {
            a.allocator().buffer(1024);
            fail("allocating from a closed allocator");
        } catch (RuntimeException expected) {
            // Arrow's closed-allocator check, or the listener's
        }
    }

    @Test
    public void leakedBuffersAreFreedAndReportedWithArrowsText() {
        Budget budget = new Budget(Long.MAX_VALUE);
        NativeMemoryManager mm = manager("leak", budget, NativeMemoryConfig.defaults().withReservationBlockSize(MIB));
        NativeArrowAllocator a = NativeArrowAllocator.create(mm, "leaky", "arrow", MIB);
        BufferAllocator alloc = a.allocator();
        IntVector v = new IntVector("forgotten", alloc);
        v.allocateNew(100_000);
        ArrowBuf b = alloc.buffer(3 * MIB);
        ArrowBuf ok = alloc.buffer(MIB);
        ok.close();
        long leaked = alloc.getAllocatedMemory();
        int live = a.liveAllocations();
        assertTrue("the vector and the buffer: " + live, live >= 2);
        assertAccounting("before close", a, mm, 0);

        a.close();
        ArrowCloseReport report = a.closeReport();
        assertTrue(report.hasLeaks());
        assertEquals(leaked, report.leakedBytes());
        assertEquals("every leaked allocation freed", live, report.leakedBuffers());
        assertEquals(leaked, report.freedBytes());
        assertEquals(0, a.liveAllocations());
        String text = report.arrowText();
        assertNotNull(text);
        // Arrow's own words: "Memory was leaked by query" (or, in Arrow's debug mode, which
        // assertions turn on, "closed with outstanding buffers allocated").
        assertTrue(text, text.contains("Memory was leaked") || text.contains("outstanding buffers"));
        assertTrue(text, text.contains("Allocator tree:"));
        assertTrue(report.text(), report.text().contains("'leaky' closed with " + leaked + " bytes"));
        assertTrue(report.text(), report.text().contains("freed"));
        assertEquals("the close released the pool: not a native leak", 0, mm.usedBytes());
        assertTrue(a.listener().isClosed());

        mm.close();
        NativeCloseReport r = mm.closeReport();
        assertFalse("the manager found no leak of its own: " + r.text(), r.hasLeaks());
        assertEquals(0, budget.held.get());
        // v and b still exist as Java objects, but their memory is gone: never touch them.
    }

    @Test
    public void leakedChildAllocatorIsFreedToo() {
        NativeMemoryManager mm = manager("child-leak");
        NativeArrowAllocator a = NativeArrowAllocator.create(mm, "tree", "arrow", MIB);
        BufferAllocator child = a.allocator().newChildAllocator("operator", 0, Long.MAX_VALUE);
        child.buffer(2 * MIB);
        a.close();
        ArrowCloseReport report = a.closeReport();
        assertTrue(report.hasLeaks());
        assertEquals(2 * MIB, report.leakedBytes());
        assertEquals(2 * MIB, report.freedBytes());
        assertTrue(report.arrowText(), report.arrowText().contains("operator"));
        assertEquals(0, mm.usedBytes());
    }

    @Test
    public void managerClosedFirstReleasesTheArrowPoolAsALeak() {
        NativeMemoryManager mm = manager("wrong-order");
        NativeArrowAllocator a = NativeArrowAllocator.create(mm, "late", "arrow", MIB);
        ArrowBuf b = a.allocator().buffer(MIB);
        mm.close();
        NativeCloseReport r = mm.closeReport();
        assertTrue("the open Arrow reservation is a leak for the manager: " + r.text(), r.hasLeaks());
        assertTrue(r.text(), r.text().contains("arrow"));
        b.close(); // Arrow releases after the manager closed: ignored by the listener
        a.close(); // and the late close neither throws nor calls the closed manager
        assertFalse(a.closeReport().hasLeaks());
    }
}
