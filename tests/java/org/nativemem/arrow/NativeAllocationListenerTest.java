package org.nativemem.arrow;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Random;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.arrow.memory.AllocationReservation;
import org.apache.arrow.memory.ArrowBuf;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.memory.OutOfMemoryException;
import org.apache.arrow.vector.BigIntVector;
import org.apache.arrow.vector.IntVector;
import org.apache.arrow.vector.VarCharVector;
import org.apache.arrow.vector.util.TransferPair;
import org.junit.Test;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;

/**
 * {@link NativeAllocationListener} against Arrow Java (the version of the Spark jars the build
 * uses): exact accounting after every step, the block and hysteresis math, refusal with Arrow's
 * {@link OutOfMemoryException}, child allocators and transfers, Arrow's reservation path, many
 * threads, and JNI calls per GiB.
 */
public class NativeAllocationListenerTest extends ArrowTestSupport {

    private NativeArrowAllocator arrow(NativeMemoryManager mm, long block) {
        return track(NativeArrowAllocator.create(mm, "test", "arrow", block));
    }

    @Test
    public void blocksGrowAndShrinkWithHysteresis() {
        NativeMemoryManager mm = manager("blocks");
        NativeArrowAllocator a = arrow(mm, MIB);
        BufferAllocator alloc = a.allocator();
        NativeAllocationListener l = a.listener();
        assertEquals("opening the reservation", 1, l.jniCalls());
        assertAccounting("empty", a, mm, 0);
        assertEquals(0, l.reservedBytes());

        // Power-of-two sizes: Arrow's rounding keeps them as they are.
        List<ArrowBuf> bufs = new ArrayList<>();
        bufs.add(alloc.buffer(256 * KIB));
        assertEquals("first buffer: one block", MIB, l.reservedBytes());
        assertEquals(2, l.jniCalls());
        assertAccounting("256K", a, mm, 0);
        for (int i = 0; i < 3; i++) {
            bufs.add(alloc.buffer(256 * KIB));
        }
        assertEquals("1 MiB fits in the block", MIB, l.reservedBytes());
        assertEquals("no call inside the block", 2, l.jniCalls());
        assertAccounting("1M", a, mm, 0);
        bufs.add(alloc.buffer(256 * KIB));
        assertEquals("grow to whole blocks", 2 * MIB, l.reservedBytes());
        assertEquals(3, l.jniCalls());
        ArrowBuf big = alloc.buffer(4 * MIB);
        assertEquals("5.25 MiB -> 6 blocks", 6 * MIB, l.reservedBytes());
        assertEquals(4, l.jniCalls());
        assertAccounting("5.25M", a, mm, 0);

        big.close();
        assertEquals("cushion 4.75 MiB > 2 blocks: shrink to roundUp(1.25 MiB) + 1 block", 3 * MIB, l.reservedBytes());
        assertEquals(5, l.jniCalls());
        assertAccounting("1.25M", a, mm, 0);
        bufs.remove(bufs.size() - 1).close();
        assertEquals("cushion exactly 2 blocks: kept", 3 * MIB, l.reservedBytes());
        assertEquals(5, l.jniCalls());
        bufs.remove(bufs.size() - 1).close();
        assertEquals("cushion 2.25 MiB: shrink to 1 MiB + 1 block", 2 * MIB, l.reservedBytes());
        assertEquals(6, l.jniCalls());
        assertAccounting("0.75M", a, mm, 0);

        // An allocate/free loop inside the cushion makes no JNI call.
        for (int i = 0; i < 1000; i++) {
            alloc.buffer(MIB).close();
            alloc.buffer(64 * KIB).close();
        }
        assertEquals("no call for 2000 buffers in the cushion", 6, l.jniCalls());
        assertAccounting("after the loop", a, mm, 0);

        for (ArrowBuf b : bufs) {
            b.close();
        }
        assertEquals(0, l.allocatedBytes());
        assertEquals("one block of cushion stays", 2 * MIB, l.reservedBytes());
        assertAccounting("all freed", a, mm, 0);
        assertEquals(2006, l.allocations());
        assertEquals(2006, l.releases());

        a.close();
        assertEquals("close releases every byte", 0, mm.usedBytes());
        assertEquals(0, l.reservedBytes());
        assertTrue(l.isClosed());
        assertEquals(7, l.jniCalls());
    }

    @Test
    public void vectorsAllocatedAndFreedExactly() {
        NativeMemoryManager mm = manager("vectors");
        NativeArrowAllocator a = arrow(mm, MIB);
        BufferAllocator alloc = a.allocator();
        // Another pool of the same manager: Arrow and native share the task's accounting.
        NativeReservation engine = track(mm.newReservation("engine", "native-op", 3 * MIB));
        assertAccounting("native only", a, mm, 3 * MIB);

        IntVector ints = new IntVector("ints", alloc);
        ints.allocateNew(100_000);
        for (int i = 0; i < 100_000; i++) {
            ints.set(i, i);
        }
        ints.setValueCount(100_000);
        assertTrue(alloc.getAllocatedMemory() >= 400_000);
        assertAccounting("IntVector 100k", a, mm, 3 * MIB);

        BigIntVector longs = new BigIntVector("longs", alloc);
        for (int i = 0; i < 300_000; i++) {
            longs.setSafe(i, (long) i * 3); // reallocates (doubles) as it grows
            if (i % 50_000 == 0) {
                assertAccounting("BigIntVector at " + i, a, mm, 3 * MIB);
            }
        }
        longs.setValueCount(300_000);
        assertEquals(299_999L * 3, longs.get(299_999));
        assertAccounting("BigIntVector 300k", a, mm, 3 * MIB);

        VarCharVector strings = new VarCharVector("strings", alloc);
        strings.allocateNew();
        for (int i = 0; i < 50_000; i++) {
            strings.setSafe(i, ("value-" + i).getBytes(StandardCharsets.UTF_8));
        }
        strings.setValueCount(50_000);
        assertEquals("value-49999", new String(strings.get(49_999), StandardCharsets.UTF_8));
        assertAccounting("VarCharVector 50k", a, mm, 3 * MIB);
        assertEquals("Arrow's peak (reallocations hold old and new buffers)", alloc.getPeakMemoryAllocation(),
                a.listener().peakAllocatedBytes());

        longs.close();
        assertAccounting("BigIntVector closed", a, mm, 3 * MIB);
        strings.close();
        assertAccounting("VarCharVector closed", a, mm, 3 * MIB);
        ints.close();
        assertEquals(0, alloc.getAllocatedMemory());
        assertAccounting("all closed", a, mm, 3 * MIB);
        assertTrue("at most one block of cushion left over 2", a.listener().reservedBytes() <= 2 * MIB);

        a.close();
        assertEquals("only the native pool is left", 3 * MIB, mm.usedBytes());
        assertNotNull(a.closeReport());
        assertTrue(a.closeReport().text(), !a.closeReport().hasLeaks());
        assertNull(a.closeReport().arrowText());
        engine.close();
        assertEquals(0, mm.usedBytes());
    }

    @Test
    public void limitRefusesWithArrowOutOfMemoryAndChargesNothing() {
        Budget budget = new Budget(Long.MAX_VALUE);
        NativeMemoryManager mm = manager("limited", budget,
                exact().withReservationBlockSize(MIB).withTaskLimit(8 * MIB));
        NativeArrowAllocator a = arrow(mm, MIB);
        BufferAllocator alloc = a.allocator();
        NativeAllocationListener l = a.listener();

        ArrowBuf held = alloc.buffer(4 * MIB);
        ArrowBuf more = alloc.buffer(2 * MIB);
        assertAccounting("6 MiB", a, mm, 0);
        long allocatedBefore = alloc.getAllocatedMemory();
        long usedBefore = mm.usedBytes();
        long jniBefore = l.jniCalls();
        try {
            alloc.buffer(4 * MIB);
            fail("6 + 4 MiB is over the 8 MiB task limit");
        } catch (OutOfMemoryException e) {
            assertTrue(e.getMessage(), e.getMessage().startsWith("nativemem: Arrow allocation of 4194304 bytes"));
            assertTrue(e.getMessage(), e.getMessage().contains("pool 'arrow'"));
            assertTrue("the cause is nativemem's error", e.getCause() instanceof NativeOutOfMemoryException);
            NativeOutOfMemoryException cause = (NativeOutOfMemoryException) e.getCause();
            assertEquals(NativeOutOfMemoryException.Reason.POOL_LIMIT, cause.reason());
            assertTrue(cause.pool(), cause.pool().contains("arrow"));
            assertTrue("the message carries nativemem's report", e.getMessage().contains(cause.getMessage()));
            assertNotNull(cause.usageReport());
            assertTrue(cause.usageReport(), cause.usageReport().contains("arrow"));
        }
        assertEquals("Arrow allocated nothing", allocatedBefore, alloc.getAllocatedMemory());
        assertEquals("nothing charged", usedBefore, mm.usedBytes());
        assertEquals(1, l.refusals());
        assertEquals("one JNI call: the block (the exact retry is the same size here)", jniBefore + 1, l.jniCalls());
        assertAccounting("after the refusal", a, mm, 0);

        // A vector growing past the limit: setSafe fails the Arrow way, the vector stays usable.
        BigIntVector v = new BigIntVector("v", alloc);
        int n = 0;
        try {
            while (true) {
                v.setSafe(n, n);
                n++;
            }
        } catch (OutOfMemoryException e) {
            assertTrue(e.getCause() instanceof NativeOutOfMemoryException);
        }
        assertTrue("the vector grew before the limit: " + n, n > 1000);
        assertEquals(n - 1, v.get(n - 1));
        assertAccounting("vector at the limit", a, mm, 0);
        v.close();
        held.close();
        more.close();
        assertEquals(0, alloc.getAllocatedMemory());
        assertAccounting("freed", a, mm, 0);
        a.close();
        assertEquals(0, mm.usedBytes());
        mm.close();
        assertEquals("every byte back in the budget", 0, budget.held.get());
    }

    @Test
    public void blockRoundingNeverRefusesWhatFits() {
        NativeMemoryManager mm = manager("edge", new Budget(Long.MAX_VALUE),
                exact().withReservationBlockSize(MIB).withTaskLimit(2 * MIB + 512 * KIB));
        NativeArrowAllocator a = arrow(mm, MIB);
        NativeAllocationListener l = a.listener();
        ArrowBuf two = a.allocator().buffer(2 * MIB);
        assertEquals(2 * MIB, l.reservedBytes());
        // 2.5 MiB fits under the limit although its block (3 MiB) does not: the exact retry takes it.
        ArrowBuf half = a.allocator().buffer(512 * KIB);
        assertEquals(2 * MIB + 512 * KIB, l.reservedBytes());
        assertEquals(0, l.refusals());
        assertAccounting("at the limit", a, mm, 0);
        try {
            a.allocator().buffer(64);
            fail("nothing fits any more");
        } catch (OutOfMemoryException expected) {
            assertTrue(expected.getCause() instanceof NativeOutOfMemoryException);
        }
        half.close();
        two.close();
        assertAccounting("freed", a, mm, 0);
        assertEquals("cushion 2.5 MiB > 2 blocks: back to one block", MIB, l.reservedBytes());
    }

    @Test
    public void budgetExhaustedRefusesLikeSparkWould() {
        // The listener (Spark) grants 4 MiB in all; nothing can be spilled.
        Budget budget = new Budget(4 * MIB);
        NativeMemoryManager mm = manager("budget", budget, exact().withReservationBlockSize(MIB));
        NativeArrowAllocator a = arrow(mm, MIB);
        ArrowBuf b = a.allocator().buffer(2 * MIB);
        try {
            a.allocator().buffer(4 * MIB);
            fail("the budget has 2 MiB left");
        } catch (OutOfMemoryException e) {
            NativeOutOfMemoryException cause = (NativeOutOfMemoryException) e.getCause();
            assertEquals(NativeOutOfMemoryException.Reason.LISTENER_DENIED, cause.reason());
        }
        assertAccounting("after the refusal", a, mm, 0);
        b.close();
        a.close();
        mm.close();
        assertEquals(0, budget.held.get());
    }

    @Test
    public void arrowsOwnLimitReleasesTheCharge() {
        NativeMemoryManager mm = manager("arrow-limit");
        NativeArrowAllocator a = arrow(mm, MIB);
        BufferAllocator child = a.allocator().newChildAllocator("small", 0, MIB);
        try {
            child.buffer(2 * MIB);
            fail("over the child's own limit");
        } catch (OutOfMemoryException e) {
            assertNull("Arrow's own refusal, not nativemem's", e.getCause());
        }
        assertEquals("onFailedAllocation released the charge", 0, a.listener().allocatedBytes());
        assertAccounting("after Arrow's refusal", a, mm, 0);
        child.close();
    }

    @Test
    public void childAllocatorsAndTransfersStayExact() {
        NativeMemoryManager mm = manager("children");
        NativeArrowAllocator a = arrow(mm, MIB);
        BufferAllocator left = a.allocator().newChildAllocator("left", 0, Long.MAX_VALUE);
        BufferAllocator right = a.allocator().newChildAllocator("right", 0, Long.MAX_VALUE);
        assertSame("children inherit the listener", a.listener(), left.getListener());

        IntVector v = new IntVector("v", left);
        v.allocateNew(200_000);
        v.setValueCount(200_000);
        long size = left.getAllocatedMemory();
        assertTrue(size > 0);
        assertAccounting("vector in the left child", a, mm, 0);

        TransferPair tp = v.getTransferPair(right);
        tp.transfer();
        IntVector moved = (IntVector) tp.getTo();
        assertEquals(0, left.getAllocatedMemory());
        assertEquals(size, right.getAllocatedMemory());
        assertAccounting("after the transfer", a, mm, 0);
        v.close();
        left.close();
        assertAccounting("left closed", a, mm, 0);
        moved.close();
        assertEquals(0, right.getAllocatedMemory());
        assertEquals(0, a.listener().allocatedBytes());
        assertAccounting("moved vector closed", a, mm, 0);
        right.close();
        a.close();
        assertTrue(a.closeReport().text(), !a.closeReport().hasLeaks());
        assertEquals(0, mm.usedBytes());
    }

    @Test
    public void allocationReservationIsChargedToo() {
        NativeMemoryManager mm = manager("reservation");
        NativeArrowAllocator a = arrow(mm, MIB);
        AllocationReservation r = a.allocator().newReservation();
        assertTrue(r.add(4 * 1024 * 1024));
        ArrowBuf b = r.allocateBuffer();
        assertEquals("charged at onAllocation (Arrow skips onPreAllocation here)", 4 * MIB,
                a.listener().allocatedBytes());
        assertEquals(0, a.listener().unchargedBytes());
        assertAccounting("reservation buffer", a, mm, 0);
        b.close();
        r.close();
        assertEquals(0, a.listener().allocatedBytes());
        assertEquals(0, a.listener().unmatchedReleaseBytes());
        assertAccounting("released", a, mm, 0);
    }

    @Test
    public void concurrentAllocationEndsAtZero() throws Exception {
        final NativeMemoryManager mm = manager("threads");
        final NativeArrowAllocator a = arrow(mm, MIB);
        final int threads = 4;
        final CyclicBarrier start = new CyclicBarrier(threads);
        final CountDownLatch done = new CountDownLatch(threads);
        final AtomicReference<Throwable> failure = new AtomicReference<>();
        for (int t = 0; t < threads; t++) {
            final int seed = t;
            Thread th = new Thread(() -> {
                try (BufferAllocator child = a.allocator().newChildAllocator("t" + seed, 0, Long.MAX_VALUE)) {
                    Random rnd = new Random(seed);
                    start.await();
                    ArrayDeque<AutoCloseable> live = new ArrayDeque<>();
                    for (int i = 0; i < 3000; i++) {
                        BufferAllocator from = rnd.nextBoolean() ? child : a.allocator();
                        if (rnd.nextInt(4) == 0) {
                            IntVector v = new IntVector("v", from);
                            v.allocateNew(1 + rnd.nextInt(50_000));
                            live.add(v);
                        } else {
                            live.add(from.buffer(1 + rnd.nextInt(300_000)));
                        }
                        while (live.size() > rnd.nextInt(16)) {
                            live.poll().close();
                        }
                    }
                    for (AutoCloseable c : live) {
                        c.close();
                    }
                } catch (Throwable e) {
                    failure.compareAndSet(null, e);
                } finally {
                    done.countDown();
                }
            }, "arrow-" + t);
            th.start();
        }
        done.await();
        if (failure.get() != null) {
            throw new AssertionError("a thread failed", failure.get());
        }
        NativeAllocationListener l = a.listener();
        assertEquals(0, a.allocator().getAllocatedMemory());
        assertEquals(0, l.allocatedBytes());
        assertEquals(0, l.unmatchedReleaseBytes());
        assertEquals(l.allocations(), l.releases());
        assertTrue("cushion at most two blocks: " + l, l.reservedBytes() <= 2 * MIB);
        assertAccounting("all threads done", a, mm, 0);
        System.out.printf(Locale.ROOT, "Arrow concurrent: %d threads, %d buffers, %.1f MiB cumulative, %d JNI calls%n",
                threads, l.allocations(), l.allocatedTotalBytes() / (double) MIB, l.jniCalls());
        a.close();
        assertEquals(0, mm.usedBytes());
    }

    /**
     * JNI calls per GiB of Arrow buffers in 64 KiB buffers (16,384 per GiB), 1 GiB cumulative per
     * pattern. Every call moves at least one block, so the worst case is one call per block per
     * direction: a live set that swings by much more than the two-block hysteresis between
     * batches (random batches up to 64 MiB, or 256 MiB ramps) costs up to 2 GiB / 8 MiB = 256
     * calls per GiB with 8 MiB blocks (checked as that bound), and half that with 16 MiB blocks.
     * Batch-sized and streaming workloads stay far below 1/100 of a call per buffer (checked).
     */
    @Test
    public void jniCallsPerGibOfArrowBuffers() {
        NativeMemoryManager mm = manager("jni-ratio", new Budget(Long.MAX_VALUE), NativeMemoryConfig.defaults());
        long buf = 64 * KIB;
        long perGib = GIB / buf;

        long block = NativeAllocationListener.DEFAULT_BLOCK_BYTES;
        long[] batches = measure(mm, "batches of 16 MiB", buf, block, (alloc, live) -> {
            for (int round = 0; round < 64; round++) {
                for (int i = 0; i < 256; i++) {
                    live.add(alloc.buffer(buf));
                }
                closeAll(live);
            }
        });
        long[] window = measure(mm, "sliding window of 32 MiB", buf, block, (alloc, live) -> {
            for (long i = 0; i < perGib; i++) {
                live.add(alloc.buffer(buf));
                if (live.size() > 512) {
                    live.poll().close();
                }
            }
            closeAll(live);
        });
        Workload randomBatches = (alloc, live) -> {
            Random rnd = new Random(7);
            long total = 0;
            while (total < GIB) {
                int n = 1 + rnd.nextInt(1024);
                for (int i = 0; i < n; i++) {
                    live.add(alloc.buffer(buf));
                }
                total += n * buf;
                closeAll(live);
            }
        };
        long[] random = measure(mm, "random batches of 64 KiB..64 MiB", buf, block, randomBatches);
        long[] random16 = measure(mm, "random batches", buf, 16 * MIB, randomBatches);
        long[] ramp = measure(mm, "ramp: 4 waves of 256 MiB up and down", buf, block, (alloc, live) -> {
            for (int wave = 0; wave < 4; wave++) {
                for (int i = 0; i < 4096; i++) {
                    live.add(alloc.buffer(buf));
                }
                closeAll(live);
            }
        });
        for (long[] m : new long[][] {batches, window, random16}) {
            assertTrue("at most 1/100 of a JNI call per buffer: " + m[1] + " calls for " + m[0] + " buffers",
                    m[1] * 100 <= m[0]);
        }
        for (long[] m : new long[][] {random, ramp}) {
            assertTrue("at most one call per block moved each way (+ open, close): " + m[1],
                    m[1] <= 2 * (m[2] / block) + 2);
        }
        assertEquals(0, mm.usedBytes());
    }

    interface Workload {
        void run(BufferAllocator alloc, ArrayDeque<ArrowBuf> live);
    }

    private static void closeAll(ArrayDeque<ArrowBuf> live) {
        while (!live.isEmpty()) {
            live.poll().close();
        }
    }

    /** @return {buffers, JNI calls, bytes} of the workload on a fresh allocator */
    private long[] measure(NativeMemoryManager mm, String name, long buf, long block, Workload w) {
        NativeArrowAllocator a = NativeArrowAllocator.create(mm, name, "arrow", block);
        ArrayDeque<ArrowBuf> live = new ArrayDeque<>();
        long startNanos = System.nanoTime();
        w.run(a.allocator(), live);
        double secs = (System.nanoTime() - startNanos) / 1e9;
        NativeAllocationListener l = a.listener();
        assertEquals(0, l.allocatedBytes());
        a.close();
        long buffers = l.allocations();
        long calls = l.jniCalls();
        long bytes = l.allocatedTotalBytes();
        double gib = bytes / (double) GIB;
        assertTrue(name + ": at least 1 GiB cumulative", bytes >= GIB);
        System.out.printf(Locale.ROOT, "Arrow JNI ratio [%s, %d MiB blocks]: %d buffers of %d KiB (%.2f GiB cumulative),"
                + " %d JNI calls (incl. open+close) = %.1f calls/GiB vs %.0f buffers/GiB: %.5f calls per buffer (1/%.0f),"
                + " %.2f s%n", name, block / MIB, buffers, buf / KIB, gib, calls, calls / gib, buffers / gib,
                calls / (double) buffers, buffers / (double) Math.max(1, calls), secs);
        return new long[] {buffers, calls, bytes};
    }
}
