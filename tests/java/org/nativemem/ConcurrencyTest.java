package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotSame;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.After;
import org.junit.Assume;
import org.junit.Test;

/** Many threads on one manager, close racing with calls in flight, upcalls from native threads. */
public class ConcurrencyTest extends NativeTestSupport {
    private final ExecutorService pool = Executors.newCachedThreadPool();

    @After
    public void stopPool() throws InterruptedException {
        pool.shutdownNow();
        assertTrue(pool.awaitTermination(10, TimeUnit.SECONDS));
    }

    /** Blocks in reserve while armed, until released. */
    static final class BlockingListener extends CountingListener {
        final AtomicBoolean armed = new AtomicBoolean();
        final CountDownLatch entered = new CountDownLatch(1);
        final CountDownLatch release = new CountDownLatch(1);

        @Override
        void beforeReserve(long bytes) {
            if (armed.get()) {
                entered.countDown();
                try {
                    if (!release.await(30, TimeUnit.SECONDS)) {
                        throw new AssertionError("never released");
                    }
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    throw new RuntimeException(e);
                }
            }
        }
    }

    @Test
    public void manyJavaThreadsOnOneManagerKeepExactTotals() throws Exception {
        final CountingListener listener = new CountingListener();
        final NativeMemoryManager m = manager("busy", listener);
        final NativeReservation shared = m.newReservation("shared", 0);
        final int threads = 8;
        final int iterations = 3000;
        final CountDownLatch start = new CountDownLatch(1);
        List<Future<Long>> results = new ArrayList<Future<Long>>();
        for (int t = 0; t < threads; t++) {
            final int id = t;
            results.add(pool.submit(() -> {
                Random random = new Random(id);
                long sharedHeld = 0;
                start.await();
                try (NativeReservation own = m.newReservation("worker/" + id, 0)) {
                    long held = 0;
                    for (int i = 0; i < iterations; i++) {
                        long n = 1 + random.nextInt(256 * 1024);
                        own.grow(n);
                        held += n;
                        if (random.nextBoolean()) {
                            long back = 1 + (long) (random.nextDouble() * held);
                            own.shrink(back);
                            held -= back;
                        }
                        shared.grow(100);
                        sharedHeld += 100;
                        if (i % 100 == 0) {
                            // What this thread holds stays charged whatever the others do.
                            long used = m.usedBytes();
                            assertTrue(used + " < " + (held + sharedHeld), used >= held + sharedHeld);
                            m.spill(0);
                            m.stats();
                        }
                    }
                    assertEquals(held, own.size());
                }
                return sharedHeld;
            }));
        }
        start.countDown();
        for (Future<Long> f : results) {
            assertEquals("each worker grew the shared reservation", iterations * 100L,
                    (long) f.get(60, TimeUnit.SECONDS));
        }
        long sharedExpected = threads * iterations * 100L;
        assertEquals("native size of the shared reservation", sharedExpected, shared.size());
        assertEquals("only the shared reservation is left", sharedExpected, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
        assertTrue("at most two blocks of cushion", m.reservedBytes() - m.usedBytes() <= 2 * BLOCK);
        for (long req : listener.reserveRequests) {
            assertEquals("block multiples", 0, req % BLOCK);
        }
        shared.close();
        m.close();
        assertEquals("'busy' closed with no leaks", m.closeReport().text());
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void closeWaitsForACallInsideTheListener() throws Exception {
        final BlockingListener listener = new BlockingListener();
        final NativeMemoryManager m = manager("in-flight", listener);
        final NativeReservation r = m.newReservation("p", 0);
        listener.armed.set(true);
        Future<?> grow = pool.submit(() -> {
            r.grow(2 * MIB);
            return null;
        });
        assertTrue(listener.entered.await(10, TimeUnit.SECONDS));
        Future<?> close = pool.submit(() -> {
            m.close();
            return null;
        });
        Thread.sleep(300);
        assertFalse("close must wait for the call in the listener", close.isDone());
        assertTrue(m.isClosed());
        // New calls are refused, on the Java side and on the native side.
        expect(IllegalStateException.class, m::usedBytes);
        IllegalStateException e = expect(IllegalStateException.class,
                () -> NativeMemoryManager.nativeUsedBytes(m.nativeHandle()));
        assertContains(e.getMessage(), "is stale: it was closed or destroyed");

        listener.release.countDown();
        grow.get(10, TimeUnit.SECONDS);
        close.get(10, TimeUnit.SECONDS);
        assertContains(m.closeReport().text(), "reservation jvm#");
        assertContains(m.closeReport().text(), "in root/p: 2.0 MiB");
        assertEquals("every granted byte came back", 0, listener.reserved.get());
        r.close();
    }

    @Test
    public void timedOutCloseIsFinishedByTheLastCallNeverUnderIt() throws Exception {
        final BlockingListener listener = new BlockingListener();
        final NativeMemoryManager m = manager("slow", listener, smallBlocks().withCloseTimeoutMillis(100));
        final NativeReservation r = m.newReservation("p", 0);
        listener.armed.set(true);
        Future<?> grow = pool.submit(() -> {
            r.grow(MIB);
            return null;
        });
        assertTrue(listener.entered.await(10, TimeUnit.SECONDS));
        long started = System.nanoTime();
        NativeMemoryException e = expect(NativeMemoryException.class, m::close);
        assertTrue(System.nanoTime() - started >= TimeUnit.MILLISECONDS.toNanos(90));
        assertEquals("closing memory manager 'slow' timed out after 100 ms: 1 call(s) still in progress; it is "
                + "closed (no new calls are accepted) and its memory will be freed when they return", e.getMessage());
        assertTrue(m.isClosed());
        expect(IllegalStateException.class, () -> NativeMemoryManager.nativeUsedBytes(m.nativeHandle()));

        listener.release.countDown();
        grow.get(10, TimeUnit.SECONDS);
        eventually("the deferred close gave everything back", () -> listener.reserved.get() == 0);
        m.close();
    }

    @Test
    public void closeWaitsForANativeSpillInFlight() throws Exception {
        final long spillMillis = 2000;
        final CountingListener listener = new CountingListener();
        final NativeMemoryManager m = manager("spilling", listener);
        NativeTesting.registerSpiller(m.handle(), "sort", 4 * MIB, spillMillis);
        final long handle = m.handle();
        assertEquals(0, NativeTesting.inFlight(handle));
        long spillStarted = System.nanoTime();
        Future<Long> spill = pool.submit(() -> m.spill(MIB));
        eventually("the spill is in flight", () -> NativeTesting.inFlight(handle) == 1);
        long closeStarted = System.nanoTime();
        // Conclusive only if close starts well before the spill can end: then a close that did not
        // wait would return before spillMillis. On a machine too slow for that, skip (not pass).
        Assume.assumeTrue("close started " + TimeUnit.NANOSECONDS.toMillis(closeStarted - spillStarted)
                + " ms after the spill", closeStarted - spillStarted < TimeUnit.MILLISECONDS.toNanos(spillMillis / 2));
        m.close();
        long sinceSpillMillis = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - spillStarted);
        assertTrue("close returned " + sinceSpillMillis + " ms after the spill started, before it could end",
                sinceSpillMillis >= spillMillis);
        assertEquals("the spill completed normally", Long.valueOf(MIB), spill.get(10, TimeUnit.SECONDS));
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void callsRacingWithCloseSeeOnlyIllegalStateException() throws Exception {
        for (int round = 0; round < 10; round++) {
            final CountingListener listener = new CountingListener();
            final NativeMemoryManager m = manager("race-" + round, listener);
            final AtomicInteger ok = new AtomicInteger();
            final AtomicReference<Throwable> unexpected = new AtomicReference<Throwable>();
            final CountDownLatch running = new CountDownLatch(4);
            List<Future<?>> workers = new ArrayList<Future<?>>();
            for (int t = 0; t < 4; t++) {
                final int id = t;
                workers.add(pool.submit(() -> {
                    NativeReservation r = null;
                    try {
                        r = m.newReservation("w" + id, 0);
                        running.countDown();
                        while (true) {
                            r.grow(3 * MIB);
                            m.usedBytes();
                            r.shrink(3 * MIB);
                            m.releaseUnused(MIB);
                            ok.incrementAndGet();
                        }
                    } catch (IllegalStateException expected) {
                        // closed under us: the only acceptable failure
                    } catch (Throwable other) {
                        unexpected.compareAndSet(null, other);
                    } finally {
                        running.countDown();
                        if (r != null) {
                            r.close();
                        }
                    }
                    return null;
                }));
            }
            assertTrue(running.await(10, TimeUnit.SECONDS));
            Thread.sleep(20);
            m.close();
            for (Future<?> w : workers) {
                w.get(10, TimeUnit.SECONDS);
            }
            if (unexpected.get() != null) {
                throw new AssertionError("round " + round, unexpected.get());
            }
            assertTrue(ok.get() > 0);
            assertEquals(0, listener.reserved.get());
        }
    }

    @Test
    public void listenerClosingItsOwnManagerDefersTheCloseInsteadOfWaitingForItself() {
        final AtomicReference<NativeMemoryManager> self = new AtomicReference<NativeMemoryManager>();
        final AtomicReference<String> reportSeenInside = new AtomicReference<String>();
        CountingListener listener = new CountingListener() {
            @Override
            void beforeReserve(long bytes) {
                NativeMemoryManager mm = self.get();
                if (mm != null && reserveCalls.get() == 2) {
                    mm.close();
                    reportSeenInside.set(mm.closeReport().text());
                }
            }
        };
        NativeMemoryManager m = manager("self-closing", listener, smallBlocks().withCloseTimeoutMillis(30_000));
        NativeReservation r = m.newReservation("p", MIB);
        self.set(m);
        long started = System.nanoTime();
        r.grow(MIB); // the second reserve call closes the manager from inside the upcall
        assertTrue("did not wait for itself", System.nanoTime() - started < TimeUnit.SECONDS.toNanos(5));
        assertEquals("close deferred: called from inside a call on the same manager; it completes when the 1 "
                + "call(s) in progress return", reportSeenInside.get());
        assertTrue(m.isClosed());
        assertEquals("closed when the outer call returned", 0, listener.reserved.get());
        expect(IllegalStateException.class, () -> r.grow(1));
    }

    @Test
    public void nativeThreadsAttachOnceAsDaemonsAndCallTheListener() {
        final CountingListener listener = new CountingListener();
        final NativeMemoryManager m = manager("native-threads", listener);
        int attached = NativeTesting.growFromNativeThreads(m.handle(), "native", 4, 50, 256 * KIB);
        assertEquals("every thread stayed attached after its upcalls", 4, attached);
        // 4 threads x 12.5 MiB in 1 MiB blocks; at most 2 MiB of cushion is ever shared.
        assertTrue(listener.reserveCalls.get() >= 40);
        assertFalse(listener.threads.contains(Thread.currentThread()));
        int nativeThreads = 0;
        for (Thread t : listener.threads) {
            assertTrue("native threads are attached as daemons: " + t, t.isDaemon());
            nativeThreads++;
        }
        assertEquals(4, nativeThreads);
        assertEquals(0, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
    }

    @Test
    public void listenerExceptionOnANativeThreadReachesTheJavaCallerWithCause() {
        final RuntimeException thrown = new RuntimeException("no budget for native threads");
        final AtomicLong calls = new AtomicLong();
        CountingListener listener = new CountingListener() {
            @Override
            void beforeReserve(long bytes) {
                if (calls.incrementAndGet() > 2) {
                    throw thrown;
                }
            }
        };
        NativeMemoryManager m = manager("native-fail", listener);
        NativeMemoryException e = expect(NativeMemoryException.class,
                () -> NativeTesting.growFromNativeThreads(m.handle(), "native", 2, 20, MIB));
        assertSame(thrown, e.getCause());
        assertNotSame(thrown, e);
        assertEquals(0, m.usedBytes());
        assertEquals(listener.reserved.get(), m.reservedBytes());
    }
}
