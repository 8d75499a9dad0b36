package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import org.junit.After;
import org.junit.Before;
import org.junit.Test;

/**
 * Leaks counted, not estimated: the test library's global allocator counts every block its Rust
 * code allocates and frees ({@link NativeTesting#nativeHeapCounts()}), so after hundreds of
 * create → use → close cycles through the JNI exports the library's live blocks and bytes must be
 * back to their baseline exactly: not one byte kept per manager. An RSS envelope cannot see a
 * leak of a few KB per manager; this count sees one byte.
 *
 * <p>Each test warms up first with the same cycles it measures: the handle tables' slot vectors
 * and free lists and this thread's in-call stack grow to their steady capacity on first use and
 * keep it (capacity, not a leak; the measured cycles never need more), and the JVM's lazy class
 * and method-id lookups are done. The baseline is read once the heap is quiet (no allocation by
 * anyone for a while: native threads left by earlier tests have finished).
 */
public class LeakCountTest extends NativeTestSupport {
    static final int CYCLES = 500;
    static final int WARMUP_CYCLES = 50;
    /** Pool paths at depths 1 to 4 below the root. */
    static final String[] PATHS = {"scan", "scan/arrow", "a/b/c", "a/b/c/d"};
    /** How long the end of a run may wait for lazily freed memory (native threads exiting). */
    static final long SETTLE_MILLIS = 5_000;

    private String logLevel;

    @Before
    public void quietNativeLog() {
        // Half of the cycles leave reservations for close to reclaim: a leak report each, by design.
        logLevel = NativeTesting.setNativeLogLevel("error");
    }

    @After
    public void restoreNativeLog() {
        NativeTesting.setNativeLogLevel(logLevel);
    }

    /**
     * Create a manager, reserve in a pool at depth 1..4 and at the root, grow/shrink/resize, a
     * native spiller in the pool, spill, reclaim, release unused, the read-outs, then close (half of
     * the cycles close their reservations first, the other half leave them to the manager's close):
     * per depth, the library's live heap is back to its baseline exactly.
     */
    @Test
    public void createUseCloseCyclesLeaveTheLibraryHeapExactlyAtItsBaseline() throws Exception {
        for (String path : PATHS) {
            for (int i = 0; i < WARMUP_CYCLES; i++) {
                javaApiCycle(path, i);
            }
        }
        StringBuilder leaks = new StringBuilder();
        for (String path : PATHS) {
            long[] before = NativeTesting.quietNativeHeap(10_000);
            for (int i = 0; i < CYCLES; i++) {
                javaApiCycle(path, i);
            }
            leaks.append(measure("Java API, pool \"" + path + "\" (depth " + depth(path) + ")", before));
        }
        if (leaks.length() > 0) {
            fail("the library kept memory after every manager was closed:\n" + leaks);
        }
    }

    /**
     * The test hooks' native paths: allocations charged to a pool and freed, a spiller owned by
     * the registry and dropped, native threads growing a reservation with upcalls to the listener
     * (started, attached to the JVM, exited): back to the baseline exactly too.
     */
    @Test
    public void nativeAllocationsSpillersAndThreadsLeaveTheLibraryHeapExactlyAtItsBaseline() throws Exception {
        int cycles = CYCLES / 5;
        for (int i = 0; i < WARMUP_CYCLES / 5; i++) {
            nativePathsCycle(PATHS[i % PATHS.length], i);
        }
        long[] before = NativeTesting.quietNativeHeap(10_000);
        for (int i = 0; i < cycles; i++) {
            nativePathsCycle(PATHS[i % PATHS.length], i);
        }
        String leak = measure("native allocations, spillers and threads, pools at depths 1-4", before);
        if (!leak.isEmpty()) {
            fail("the library kept memory after every manager was closed:\n" + leak);
        }
    }

    /**
     * A Java thread that calls into the library for the first time may leave per-thread state
     * (thread-locals) while it lives; it is the thread's, not the manager's: freed when the thread
     * exits, so the heap is back to its baseline exactly after the join. Prints what a live
     * thread holds.
     */
    @Test
    public void aThreadsFirstCallLeavesNothingOnceTheThreadExits() throws Exception {
        CountingListener listener = new CountingListener();
        NativeMemoryManager mm = track(NativeMemoryManager.create("leak-count-thread", listener, smallBlocks()));
        mm.newReservation("scan/arrow", MIB).close();
        long[] before = NativeTesting.quietNativeHeap(10_000);
        final java.util.concurrent.CountDownLatch called = new java.util.concurrent.CountDownLatch(1);
        final java.util.concurrent.CountDownLatch exit = new java.util.concurrent.CountDownLatch(1);
        final java.util.concurrent.atomic.AtomicReference<Throwable> error =
                new java.util.concurrent.atomic.AtomicReference<Throwable>();
        Thread t = new Thread(() -> {
            try {
                mm.newReservation("scan/arrow", MIB).close();
                mm.spill(MIB);
                called.countDown();
                exit.await();
            } catch (Throwable e) {
                error.set(e);
                called.countDown();
            }
        }, "leak-count-fresh-thread");
        t.start();
        called.await();
        long[] during = NativeTesting.quietNativeHeap(10_000);
        exit.countDown();
        t.join();
        assertEquals("no error on the thread", null, error.get());
        long[] after = NativeTesting.awaitNativeHeap(before, SETTLE_MILLIS);
        System.out.println("LeakCountTest: a live thread after its first calls holds " + (during[0] - before[0])
                + " blocks / " + (during[1] - before[1]) + " bytes of the library's heap; after it exited: "
                + (after[0] - before[0]) + " blocks / " + (after[1] - before[1]) + " bytes");
        assertEquals("live blocks after the thread exited", before[0], after[0]);
        assertEquals("live bytes after the thread exited", before[1], after[1]);
        mm.close();
    }

    /** One manager's life through the public Java API (plus one native spiller). */
    private void javaApiCycle(String path, int i) {
        CountingListener listener = new CountingListener();
        NativeMemoryManager mm = track(NativeMemoryManager.create("leak-count-" + i, listener, smallBlocks()));
        NativeReservation r = mm.newReservation(path, "leak-count", 3 * MIB);
        r.grow(2 * MIB);
        r.shrink(MIB);
        r.resize(2 * MIB + 512 * KIB);
        NativeReservation atRoot = mm.newReservation("", MIB / 2);
        NativeTesting.registerSpiller(mm.handle(), path, 2 * MIB, 0);
        assertEquals("spilled", 2 * MIB, mm.spill(2 * MIB));
        assertTrue("reclaimed", mm.reclaim(MIB) > 0);
        mm.releaseUnused(Long.MAX_VALUE);
        assertTrue(mm.usedBytes() > 0 && mm.peakBytes() > 0 && mm.stats() != null);
        assertTrue(!mm.usageReport().isEmpty());
        if (i % 2 == 0) {
            r.close();
            atRoot.close();
        }
        mm.close();
        assertEquals("listener repaid", 0, listener.reserved.get());
    }

    /** One manager's life through the native test hooks. */
    private void nativePathsCycle(String path, int i) {
        CountingListener listener = new CountingListener();
        NativeMemoryManager mm = track(NativeMemoryManager.create("leak-count-native-" + i, listener, smallBlocks()));
        long h = mm.handle();
        long a = NativeTesting.allocate(h, path, 100 * KIB + i);
        long b = NativeTesting.allocate(h, "", 3 * KIB);
        NativeTesting.registerAndDropSpiller(h, path, MIB);
        // Whole blocks per grow: every grow is an upcall, so each thread attaches to the JVM.
        assertEquals("threads attached", 2, NativeTesting.growFromNativeThreads(h, path, 2, 4, MIB));
        assertEquals(100 * KIB + i, NativeTesting.free(h, a));
        if (i % 2 == 0) {
            assertEquals(3 * KIB, NativeTesting.free(h, b));
        }
        mm.close();
        assertEquals("listener repaid", 0, listener.reserved.get());
    }

    /**
     * Prints the live-heap difference since {@code before} (per manager too) once it is back at
     * the baseline or {@link #SETTLE_MILLIS} passed; returns a description if it is not zero.
     */
    private static String measure(String what, long[] before) throws InterruptedException {
        long[] after = NativeTesting.awaitNativeHeap(before, SETTLE_MILLIS);
        long blocks = after[0] - before[0];
        long bytes = after[1] - before[1];
        long managers = what.startsWith("Java") ? CYCLES : CYCLES / 5;
        String line = String.format("%s: %d managers created, used and closed; %d allocations (%.1f MiB) made;"
                + " live blocks %d -> %d (%+d), live bytes %d -> %d (%+d): %.1f bytes per manager", what, managers,
                after[2] - before[2], (after[3] - before[3]) / (double) MIB, before[0], after[0], blocks, before[1],
                after[1], bytes, bytes / (double) managers);
        System.out.println("LeakCountTest: " + line);
        return blocks != 0 || bytes != 0 ? line + "\n" : "";
    }

    private static int depth(String path) {
        return path.split("/").length;
    }
}
