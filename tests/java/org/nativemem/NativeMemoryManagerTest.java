package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertTrue;

import org.junit.Test;

/** Lifecycle, read-outs, block-wise reservation, spill and reservations against the real library. */
public class NativeMemoryManagerTest extends NativeTestSupport {

    @Test
    public void createWithDefaultsAndCloseWithNothingUsed() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = track(NativeMemoryManager.create("task-0", listener));
        assertEquals("task-0", m.name());
        assertSame(NativeMemoryConfig.defaults(), m.config());
        assertFalse(m.isClosed());
        assertEquals(0, m.usedBytes());
        assertEquals(0, m.peakBytes());
        assertEquals(0, m.reservedBytes());
        assertNull(m.closeReport());
        m.close();
        assertTrue(m.isClosed());
        assertEquals("'task-0' closed with no leaks", m.closeReport().text());
        assertEquals(0, listener.reserveCalls.get());
        assertEquals(0, listener.unreserveCalls.get());
    }

    @Test
    public void closeGivesEveryReservedByteBackAndIsIdempotent() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("task-1", listener);
        NativeReservation r = m.newReservation("java/arrow", 3 * MIB + 512 * KIB);
        assertEquals(3 * MIB + 512 * KIB, m.usedBytes());
        assertEquals("whole blocks", 4 * MIB, m.reservedBytes());
        assertEquals(4 * MIB, listener.reserved.get());
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
        assertEquals("'task-1' closed with no leaks", m.closeReport().text());
        int unreserves = listener.unreserveCalls.get();
        m.close();
        m.close();
        assertEquals("second close does nothing", unreserves, listener.unreserveCalls.get());
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void eachReservationReportsItsConsumersPeak() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("peaks", listener);
        try (NativeReservation build = m.newReservation("op/join", "HashBuild[1]", 3 * MIB);
                NativeReservation probe = m.newReservation("op/join", "Probe[2]", MIB)) {
            build.grow(2 * MIB);
            build.shrink(4 * MIB);
            probe.shrink(MIB);
            assertEquals(MIB, build.size());
            assertEquals("the most the build side held", 5 * MIB, build.peakBytes());
            assertEquals(MIB, probe.peakBytes());
            assertEquals("the task's peak", 6 * MIB, m.peakBytes());
        }
        m.close();
    }

    @Test
    public void tryWithResourcesCloses() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager kept;
        try (NativeMemoryManager m = NativeMemoryManager.create("twr", listener, smallBlocks());
                NativeReservation r = m.newReservation("p", 5 * MIB)) {
            kept = m;
            assertEquals(5 * MIB, r.size());
            assertEquals(5 * MIB, listener.reserved.get());
        }
        assertTrue(kept.isClosed());
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void readOutsFollowGrowAndShrink() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("task-2", listener);
        NativeReservation r = m.newReservation("scan", "reader", 0);
        assertEquals(0, r.size());
        r.grow(5 * MIB);
        assertEquals(5 * MIB, r.size());
        assertEquals(5 * MIB, m.usedBytes());
        assertEquals(5 * MIB, m.peakBytes());
        assertEquals(5 * MIB, m.reservedBytes());
        r.shrink(3 * MIB);
        assertEquals(2 * MIB, r.size());
        assertEquals(2 * MIB, m.usedBytes());
        assertEquals("peak stays", 5 * MIB, m.peakBytes());
        // 3 MiB unused is above two blocks: handed back down to one block of cushion.
        assertEquals(3 * MIB, m.reservedBytes());
        assertEquals(3 * MIB, listener.reserved.get());
        r.resize(4 * MIB);
        assertEquals(4 * MIB, r.size());
        assertEquals(4 * MIB, m.usedBytes());
        r.resize(0);
        assertEquals(0, m.usedBytes());

        NativeMemoryStats s = m.stats();
        assertEquals(0, s.usedBytes());
        assertEquals(5 * MIB, s.peakBytes());
        assertEquals(m.reservedBytes(), s.reservedBytes());
        assertEquals(listener.reserveCalls.get(), s.reserveCalls());
        assertEquals(listener.unreserveCalls.get(), s.unreserveCalls());
        assertEquals(0, s.spillCount());
        assertEquals(0, s.liveAllocations());
        r.close();
    }

    @Test
    public void usageReportShowsTheTreeAndConsumers() {
        NativeMemoryManager m = manager("stage-3 task-17", new CountingListener());
        NativeReservation r = m.newReservation("java/arrow", "buffers", 2 * MIB);
        String report = m.usageReport();
        assertContains(report, "Native memory of 'stage-3 task-17': used 2.0 MiB, peak 2.0 MiB, reserved 2.0 MiB");
        assertContains(report, "task limit none, block 1.0 MiB");
        assertContains(report, "Pools:");
        assertContains(report, "java");
        assertContains(report, "arrow");
        assertContains(report, "Top consumers:\n  1. buffers#");
        assertContains(report, " in root/java/arrow: used 2.0 MiB, peak 2.0 MiB");
        r.close();
    }

    @Test
    public void listenerIsAskedInWholeBlocksOnly() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("blocks", listener);
        NativeReservation r = m.newReservation("p", 0);
        for (int i = 0; i < 100; i++) {
            r.grow(64 * KIB);
        }
        assertEquals(6 * MIB + 256 * KIB, m.usedBytes());
        assertEquals("one call per block crossed", 7, listener.reserveCalls.get());
        for (long req : listener.reserveRequests) {
            assertEquals("each request is one block", BLOCK, req);
        }
        assertEquals(7 * MIB, m.reservedBytes());
        r.grow(10 * MIB + 512 * KIB);
        assertEquals(8, listener.reserveCalls.get());
        // 768 KiB were left in the cushion; 9.75 MiB more rounds up to 10 blocks.
        assertEquals(Long.valueOf(10 * MIB), listener.reserveRequests.get(7));
        r.close();
    }

    @Test
    public void growShrinkLoopAtABlockEdgeMakesNoListenerCalls() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("edge", listener);
        NativeReservation r = m.newReservation("p", BLOCK);
        int reserves = listener.reserveCalls.get();
        int unreserves = listener.unreserveCalls.get();
        for (int i = 0; i < 1000; i++) {
            r.grow(64 * KIB);
            r.shrink(64 * KIB);
        }
        assertEquals("hysteresis: one more block reserved once", reserves + 1, listener.reserveCalls.get());
        assertEquals(unreserves, listener.unreserveCalls.get());
        assertEquals(BLOCK, m.usedBytes());
        r.close();
    }

    @Test
    public void taskLimitRefusesWithTheUsageReport() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("limited", listener, smallBlocks().withTaskLimit(4 * MIB));
        NativeReservation r = m.newReservation("hash", "table", 3 * MIB);
        NativeOutOfMemoryException e = expect(NativeOutOfMemoryException.class, () -> r.grow(2 * MIB));
        assertContains(e.getMessage(), "Failed to reserve 2.0 MiB for consumer 'table#");
        assertContains(e.getMessage(), "in pool 'root/hash': pool 'root' would exceed its limit of 4.0 MiB (used 3.0 MiB)");
        assertContains(e.getMessage(), "Native memory of 'limited': used 3.0 MiB");
        assertContains(e.getMessage(), "task limit 4.0 MiB");
        assertEquals("nothing changed", 3 * MIB, r.size());
        assertEquals(3 * MIB, m.usedBytes());
        r.grow(MIB);
        assertEquals(4 * MIB, m.usedBytes());
        r.close();
    }

    @Test
    public void listenerGrantingTooLittleIsOutOfMemoryAndAccountingStaysExact() {
        CountingListener listener = new CountingListener(2 * MIB);
        NativeMemoryManager m = manager("starved", listener);
        NativeOutOfMemoryException e = expect(NativeOutOfMemoryException.class, () -> m.newReservation("p", 3 * MIB));
        assertContains(e.getMessage(), "Failed to reserve 3.0 MiB");
        assertContains(e.getMessage(), "the reservation listener granted 2.0 MiB of the 3.0 MiB asked, after spilling");
        assertEquals(0, m.usedBytes());
        assertEquals("what was granted is counted", listener.reserved.get(), m.reservedBytes());
        NativeReservation r = m.newReservation("p", 2 * MIB);
        assertEquals(2 * MIB, m.usedBytes());
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void spillFromJavaReachesANativeSpiller() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("spilly", listener);
        NativeTesting.registerSpiller(m.handle(), "sort", 6 * MIB, 0);
        assertEquals(6 * MIB, m.usedBytes());
        assertEquals(2 * MIB, m.spill(2 * MIB));
        assertEquals(4 * MIB, m.usedBytes());
        NativeMemoryStats s = m.stats();
        assertEquals(1, s.spillCount());
        assertEquals(2 * MIB, s.spilledBytes());
        assertEquals("spilled bytes stay reserved", 6 * MIB, m.reservedBytes());
        assertEquals(0, m.spill(0));
    }

    @Test
    public void reclaimGivesBackCushionThenSpilledBytes() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("two-phase", listener);
        NativeTesting.registerSpiller(m.handle(), "sort", 6 * MIB, 0);
        assertEquals(2 * MIB, m.spill(2 * MIB));
        // used 4 MiB, reserved 6 MiB: 2 MiB of cushion, then 1 MiB spilled.
        assertEquals(3 * MIB, m.reclaim(3 * MIB));
        assertEquals(3 * MIB, m.usedBytes());
        assertEquals(3 * MIB, m.reservedBytes());
        assertEquals(3 * MIB, listener.reserved.get());
        assertEquals(2, m.stats().spillCount());
        // Nothing spillable beyond what the spiller holds.
        assertEquals(3 * MIB, m.reclaim(100 * MIB));
        assertEquals(0, m.usedBytes());
        assertEquals(0, listener.reserved.get());
        assertEquals(0, m.reclaim(MIB));
    }

    @Test
    public void releaseUnusedHandsBackOnlyTheCushion() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("cushion", listener);
        NativeReservation r = m.newReservation("p", 2 * MIB + 1);
        assertEquals(3 * MIB, m.reservedBytes());
        assertEquals(MIB - 1, m.releaseUnused(Long.MAX_VALUE));
        assertEquals(2 * MIB + 1, m.reservedBytes());
        assertEquals(2 * MIB + 1, listener.reserved.get());
        assertEquals(0, m.releaseUnused(Long.MAX_VALUE));
        r.close();
    }

    @Test
    public void javaReservationGetsMemoryBySpillingANativeConsumer() {
        CountingListener listener = new CountingListener(8 * MIB);
        NativeMemoryManager m = manager("shared", listener);
        NativeTesting.registerSpiller(m.handle(), "sort", 6 * MIB, 0);
        NativeReservation r = m.newReservation("java/arrow", 4 * MIB);
        assertEquals(4 * MIB, r.size());
        assertEquals(8 * MIB, m.usedBytes());
        assertEquals(1, m.stats().spillCount());
        assertEquals(2 * MIB, m.stats().spilledBytes());
        assertEquals(8 * MIB, listener.reserved.get());
        r.close();
    }

    @Test
    public void reservationCloseIsIdempotentAndFreesItsBytes() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("r", listener);
        NativeReservation r = m.newReservation("p", "c", 3 * MIB);
        assertEquals("p", r.poolPath());
        assertEquals("c", r.consumer());
        assertSame(m, r.manager());
        assertFalse(r.isClosed());
        r.close();
        assertTrue(r.isClosed());
        assertEquals(0, m.usedBytes());
        r.close();
        assertEquals(0, m.usedBytes());
        m.close();
        assertEquals("'r' closed with no leaks", m.closeReport().text());
    }

    @Test
    public void reservationLeftOpenIsReleasedAndReportedByClose() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("leaky", listener);
        NativeReservation r = m.newReservation("java/netty", "pool-chunks", 3 * MIB);
        long address = NativeTesting.allocate(m.handle(), "op/sort", 1000);
        assertTrue(address != 0);
        assertEquals(3 * MIB + 1000, m.usedBytes());
        assertEquals(1, m.stats().liveAllocations());
        assertEquals("the live block's bytes", 1000, m.stats().allocatedBytes());
        m.close();
        String report = m.closeReport().text();
        assertContains(report, "'leaky' closed with 3.0 MiB leaked at close (reclaimed):");
        assertContains(report, "1 allocation(s) in root/op/sort: 1000 B");
        assertContains(report, "reservation pool-chunks#");
        assertContains(report, " in root/java/netty: 3.0 MiB");
        assertEquals(0, listener.reserved.get());
        assertTrue(r.isClosed());
        r.close();
        expect(IllegalStateException.class, () -> r.size());
    }

    @Test
    public void nativeAllocationIsChargedAndFreed() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("alloc", listener);
        long address = NativeTesting.allocate(m.handle(), "op", 4096);
        assertEquals(4096, m.usedBytes());
        assertEquals(4096, NativeTesting.free(m.handle(), address));
        assertEquals(0, m.usedBytes());
        assertEquals(0, m.stats().liveAllocations());
        m.close();
        assertEquals("'alloc' closed with no leaks", m.closeReport().text());
    }

    @Test
    public void handleIsStableAndNamesTheManager() {
        NativeMemoryManager m = manager("h", new CountingListener());
        long h = m.handle();
        assertTrue("handles are positive", h > 0);
        assertEquals(h, m.handle());
        assertContains(m.toString(), "name='h', handle=" + hex(h));
        NativeMemoryManager other = manager("h2", new CountingListener());
        assertTrue(other.handle() != h);
    }
}
