package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.Test;

/**
 * {@link NativeReservation}'s Java-side slack: with a reservation quantum, grows and shrinks are
 * served from whole quanta charged to the native reservation; {@code size()} and
 * {@code peakBytes()} stay exact, the charged bytes stay within two quanta of the size (one after
 * a refusal), and close gives everything back. Quantum 0 keeps one JNI call per call, exact.
 */
public class JavaSlackTest extends NativeTestSupport {
    private static final long QUANTUM = 256 * KIB;

    private NativeMemoryManager quantumManager(String name, CountingListener listener) {
        return manager(name, listener, smallBlocks().withReservationQuantum(QUANTUM));
    }

    /** The native reservation's size: what the pools count for this reservation. */
    private static long nativeSize(NativeReservation r) {
        return NativeReservation.nativeSize(r.nativeHandle());
    }

    /**
     * Charged bytes are at least the size and at most {@code bound} above it, and the native
     * reservation holds exactly them (no byte lost or counted twice). Calls must have stopped.
     */
    private static void assertWithinBound(NativeReservation r, long bound) {
        assertEquals("the native reservation holds what Java charged", r.chargedBytes(), nativeSize(r));
        long slack = r.chargedBytes() - r.size();
        assertTrue("charged " + r.chargedBytes() + " below size " + r.size(), slack >= 0);
        assertTrue("slack " + slack + " above " + bound, slack <= bound);
    }

    @Test
    public void growsWithinTheSlackMakeNoNativeCallAndSizesAreExact() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = quantumManager("slack-exact", listener);
        NativeReservation r = m.newReservation("scan", "reader", 100);
        assertEquals(QUANTUM, r.quantum());
        assertEquals(100, r.size());
        assertEquals(100, r.peakBytes());
        assertEquals("one quantum charged", QUANTUM, r.chargedBytes());
        assertEquals(QUANTUM, m.usedBytes());
        for (int i = 0; i < 10_000; i++) {
            r.grow(64);
            r.shrink(64);
        }
        assertEquals(100, r.size());
        assertEquals(164, r.peakBytes());
        assertEquals(QUANTUM, r.chargedBytes());
        assertContains(m.usageReport(), "used 256.0 KiB");
        // Past the slack: the shortfall rounded up to whole quanta.
        r.grow(3 * QUANTUM);
        assertEquals(100 + 3 * QUANTUM, r.size());
        assertEquals(4 * QUANTUM, r.chargedBytes());
        assertEquals(4 * QUANTUM, m.usedBytes());
        // Shrinks keep up to two quanta of slack; beyond, they give back all but one.
        r.shrink(QUANTUM + 100);
        assertEquals(2 * QUANTUM, r.size());
        assertEquals("two quanta of slack kept", 4 * QUANTUM, r.chargedBytes());
        r.shrink(1);
        assertEquals("all but one quantum of slack given back", 3 * QUANTUM - 1, r.chargedBytes());
        r.shrink(2 * QUANTUM - 1);
        assertEquals(0, r.size());
        assertEquals(QUANTUM, r.chargedBytes());
        r.grow(100);
        assertEquals(QUANTUM, r.chargedBytes());
        assertTrue("pools hold the charged bytes and at most two native quanta",
                m.usedBytes() >= QUANTUM && m.usedBytes() <= 3 * QUANTUM);
        assertEquals(100 + 3 * QUANTUM, r.peakBytes());
        r.resize(5 * QUANTUM);
        assertEquals(5 * QUANTUM, r.size());
        assertEquals(5 * QUANTUM, r.peakBytes());
        assertWithinBound(r, QUANTUM);
        r.resize(7);
        assertEquals(7, r.size());
        assertWithinBound(r, 2 * QUANTUM);
        r.close();
        assertEquals(0, m.usedBytes());
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void shrinkingByMoreThanTheSizeChangesNothing() {
        NativeMemoryManager m = quantumManager("slack-over-shrink", new CountingListener());
        NativeReservation r = m.newReservation("scan", "reader", 1000);
        long charged = r.chargedBytes();
        IllegalArgumentException e = expect(IllegalArgumentException.class, () -> r.shrink(1001));
        assertContains(e.getMessage(), "it holds 1000 B (1000 bytes)");
        assertEquals(1000, r.size());
        assertEquals(charged, r.chargedBytes());
        expect(IllegalArgumentException.class, () -> r.grow(-1));
        expect(IllegalArgumentException.class, () -> r.shrink(-1));
        expect(IllegalArgumentException.class, () -> r.resize(-1));
        assertEquals(1000, r.size());
        r.shrink(1000);
        assertEquals(0, r.size());
        assertEquals(1000, r.peakBytes());
    }

    @Test
    public void quantumZeroIsExactWithOneNativeCallPerCall() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("slack-zero", listener);
        assertEquals(0, m.config().reservationQuantum());
        NativeReservation r = m.newReservation("scan", "reader", 100);
        assertEquals(0, r.quantum());
        for (int i = 1; i <= 100; i++) {
            r.grow(i);
            assertEquals("pools hold exactly the size", r.size(), m.usedBytes());
        }
        r.shrink(5000);
        assertEquals(100 + 5050 - 5000, r.size());
        assertEquals(r.size(), m.usedBytes());
        assertEquals(r.size(), r.chargedBytes());
        assertEquals(5150, r.peakBytes());
        assertContains(m.usageReport(), "used 150 B");
        r.close();
        assertEquals(0, m.usedBytes());
    }

    @Test
    public void refusalsUnderATaskLimitChangeNothingAndLeaveNoSlackAboveTheBound() {
        CountingListener listener = new CountingListener();
        // A limit that is not a multiple of the quantum: the rounding must not refuse what fits.
        long limit = 10 * QUANTUM + 1000;
        NativeMemoryManager m = manager("slack-limit", listener,
                smallBlocks().withReservationQuantum(QUANTUM).withTaskLimit(limit));
        NativeReservation a = m.newReservation("a", 0);
        NativeReservation b = m.newReservation("b", 0);
        a.grow(4 * QUANTUM);
        b.grow(QUANTUM + 10);
        // b holds 2 quanta; 4 + 2 charged. a can take exactly what is left, not one byte more.
        long left = limit - a.chargedBytes() - b.chargedBytes();
        expect(NativeOutOfMemoryException.class, () -> a.grow(left + 1));
        assertEquals(4 * QUANTUM, a.size());
        assertWithinBound(a, QUANTUM);
        a.grow(left);
        assertEquals(4 * QUANTUM + left, a.size());
        assertEquals("exact charge at the limit", a.size(), a.chargedBytes());
        assertEquals(limit, m.usedBytes());
        NativeOutOfMemoryException e = expect(NativeOutOfMemoryException.class, () -> a.grow(1));
        assertTrue(e.getMessage().length() > 0);
        assertEquals(4 * QUANTUM + left, a.size());
        assertEquals(4 * QUANTUM + left, a.peakBytes());
        // b's slack still serves b without a native call; past it, b is refused too.
        b.grow(QUANTUM - 10);
        expect(NativeOutOfMemoryException.class, () -> b.grow(1));
        assertEquals(2 * QUANTUM, b.size());
        assertWithinBound(b, QUANTUM);
        // Frees make room again.
        a.shrink(a.size());
        assertWithinBound(a, 2 * QUANTUM);
        b.grow(3 * QUANTUM);
        assertEquals(5 * QUANTUM, b.size());
        a.close();
        b.close();
        assertEquals(0, m.usedBytes());
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void creationChargesWholeQuantaOrExactlyWhatFitsUnderALimit() {
        long limit = 10 * QUANTUM + 1000;
        NativeMemoryManager m = manager("slack-create", new CountingListener(),
                smallBlocks().withReservationQuantum(QUANTUM).withTaskLimit(limit));
        NativeReservation small = m.newReservation("s", 10);
        assertEquals(QUANTUM, small.chargedBytes());
        small.close();
        // 11 quanta do not fit: the exact size does.
        NativeReservation r = m.newReservation("r", 10 * QUANTUM + 500);
        assertEquals(10 * QUANTUM + 500, r.size());
        assertEquals(10 * QUANTUM + 500, r.chargedBytes());
        expect(NativeOutOfMemoryException.class, () -> m.newReservation("t", 501));
        assertEquals(10 * QUANTUM + 500, m.usedBytes());
        r.close();
        assertEquals(0, m.usedBytes());
    }

    @Test
    public void aGrowRefusedAfterEarlierRoundsChargedKeepsAtMostOneQuantum() throws Exception {
        // Threads racing for one reservation's slack under a limit: whatever the interleaving,
        // a refused grow leaves no more than one quantum of slack, and sizes stay exact.
        CountingListener listener = new CountingListener();
        long limit = 40 * QUANTUM;
        NativeMemoryManager m = manager("slack-race-limit", listener,
                smallBlocks().withReservationQuantum(QUANTUM).withTaskLimit(limit));
        final NativeReservation r = m.newReservation("r", 0);
        final int threads = 4;
        final long[] held = new long[threads];
        runTogether(threads, id -> {
            Random rnd = new Random(id);
            for (int i = 0; i < 20_000; i++) {
                long n = 1 + rnd.nextInt((int) (3 * QUANTUM));
                if (rnd.nextBoolean() || held[id] < n) {
                    try {
                        r.grow(n);
                        held[id] += n;
                        long natively = nativeSize(r);
                        if (natively < held[id]) {
                            throw new AssertionError("native size " + natively + " < held " + held[id]);
                        }
                    } catch (NativeOutOfMemoryException refused) {
                        // refused: nothing changed
                    }
                } else {
                    r.shrink(n);
                    held[id] -= n;
                }
            }
            r.shrink(held[id]);
            held[id] = 0;
        });
        assertEquals(0, r.size());
        assertWithinBound(r, 2 * QUANTUM);
        assertTrue("pools never above the limit", m.peakBytes() <= limit);
        r.close();
        assertEquals(0, m.usedBytes());
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void concurrentGrowsAndShrinksEndAtZeroWithAnExactPeak() throws Exception {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = quantumManager("slack-concurrent", listener);
        final NativeReservation r = m.newReservation("shared", 0);
        final int threads = 4;
        final int rounds = 200_000;
        runTogether(threads, id -> {
            Random rnd = new Random(42 + id);
            for (int i = 0; i < rounds; i++) {
                // Sizes around the quantum so fast and slow paths (grow and trim) interleave.
                long n = 1 + rnd.nextInt((int) (QUANTUM / 2));
                if ((i & 1) == 0) {
                    r.grow(n);
                    r.grow(n);
                    r.shrink(n);
                    r.shrink(n);
                } else {
                    r.grow(3 * n);
                    // What this thread holds is covered natively whatever the others do.
                    long natively = nativeSize(r);
                    if (natively < 3 * n) {
                        throw new AssertionError("native size " + natively + " < held " + 3 * n);
                    }
                    r.shrink(3 * n);
                }
            }
        });
        assertEquals("every byte grown was shrunk", 0, r.size());
        assertWithinBound(r, 2 * QUANTUM);
        assertTrue("peak at most all threads' largest holdings", r.peakBytes() <= threads * 3 * (QUANTUM / 2));
        assertTrue(r.peakBytes() > 0);
        assertTrue("pools hold what the reservation charged, and at most two native quanta more",
                m.usedBytes() >= r.chargedBytes() && m.usedBytes() <= r.chargedBytes() + 2 * QUANTUM);
        r.close();
        assertEquals("pool usage back to 0 after close", 0, m.usedBytes());
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void thePeakIsTheExactPeakOfTheSize() {
        NativeMemoryManager m = quantumManager("slack-peak", new CountingListener());
        NativeReservation r = m.newReservation("p", 0);
        long size = 0;
        long peak = 0;
        Random rnd = new Random(7);
        for (int i = 0; i < 10_000; i++) {
            long n = rnd.nextInt((int) (2 * QUANTUM));
            if (rnd.nextBoolean()) {
                r.grow(n);
                size += n;
            } else if (n <= size) {
                r.shrink(n);
                size -= n;
            } else {
                r.resize(n);
                size = n;
            }
            peak = Math.max(peak, size);
            assertEquals(size, r.size());
            assertEquals(peak, r.peakBytes());
            assertWithinBound(r, 2 * r.quantumFor(size));
        }
        r.close();
        assertEquals(0, m.usedBytes());
    }

    @Test
    public void theQuantumGrowsWithTheReservationUpToEightTimesTheConfiguredOne() {
        NativeMemoryManager m = quantumManager("slack-large", new CountingListener());
        NativeReservation r = m.newReservation("large", 0);
        assertEquals(QUANTUM, r.quantumFor(16 * QUANTUM));
        assertEquals(QUANTUM, r.quantumFor(32 * QUANTUM - 1));
        assertEquals(2 * QUANTUM, r.quantumFor(32 * QUANTUM));
        assertEquals(4 * QUANTUM, r.quantumFor(48 * QUANTUM));
        assertEquals(8 * QUANTUM, r.quantumFor(1000 * QUANTUM));
        int charges = 0;
        for (int i = 0; i < 4096; i++) {
            long before = r.chargedBytes();
            r.grow(QUANTUM / 4);
            charges += r.chargedBytes() != before ? 1 : 0;
            assertEquals("charged in whole quanta", 0, r.chargedBytes() % QUANTUM);
            assertWithinBound(r, 8 * QUANTUM);
        }
        assertEquals(1024 * QUANTUM, r.size());
        // 16 + 16 + 8 + 4 + ~10 + 112 native grows, against 1024 with a fixed quantum.
        assertTrue("native grows: " + charges, charges < 200);
        r.shrink(1000 * QUANTUM);
        assertWithinBound(r, 2 * QUANTUM); // 24 quanta held: the quantum is q again
        assertEquals(1024 * QUANTUM, r.peakBytes());
        r.close();
        assertEquals(0, m.usedBytes());
    }

    @Test
    public void closeReleasesTheChargedBytesOnceAndLaterCallsThrow() {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = quantumManager("slack-close", listener);
        NativeReservation r = m.newReservation("c", 10);
        NativeReservation other = m.newReservation("c", 10);
        r.close();
        r.close();
        assertEquals("only the other reservation's quantum left", QUANTUM, m.usedBytes());
        assertContains(expect(IllegalStateException.class, () -> r.grow(1)).getMessage(), "is closed");
        expect(IllegalStateException.class, () -> r.shrink(1));
        expect(IllegalStateException.class, () -> r.size());
        expect(IllegalStateException.class, () -> r.peakBytes());
        other.grow(5);
        m.close();
        assertContains(expect(IllegalStateException.class, () -> other.grow(1)).getMessage(), "is closed");
        expect(IllegalStateException.class, () -> other.size());
        other.close();
        assertEquals("the manager's close released the slack too", 0, listener.reserved.get());
        assertEquals("the leak report counts the charged bytes", QUANTUM, m.closeReport().leakedBytes());
    }

    /** What each thread of {@link #runTogether} runs, given its index. */
    private interface Body {
        void run(int id) throws Exception;
    }

    /** Runs {@code body} on {@code threads} threads started together; rethrows the first failure. */
    private static void runTogether(int threads, Body body) throws InterruptedException {
        AtomicReference<Throwable> failure = new AtomicReference<Throwable>();
        CountDownLatch start = new CountDownLatch(1);
        List<Thread> workers = new ArrayList<Thread>();
        for (int t = 0; t < threads; t++) {
            final int id = t;
            Thread w = new Thread(() -> {
                try {
                    start.await();
                    body.run(id);
                } catch (Throwable e) {
                    failure.compareAndSet(null, e);
                }
            });
            workers.add(w);
            w.start();
        }
        start.countDown();
        for (Thread w : workers) {
            w.join();
        }
        if (failure.get() != null) {
            throw new AssertionError(failure.get());
        }
    }
}
