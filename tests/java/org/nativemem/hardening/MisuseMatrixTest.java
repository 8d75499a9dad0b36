package org.nativemem.hardening;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.Callable;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

import org.junit.After;
import org.junit.Test;
import org.nativemem.NativeMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeMemoryStats;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;

/**
 * The misuses that {@code org.nativemem.MisuseTest}, {@code ConcurrencyTest} and
 * {@code ListenerFailureTest} do not already cover, as one table: zero and huge sizes,
 * over-release (also concurrent), native double free and cross-manager free, stale handles into
 * the test natives, odd names, listeners that grant far more than asked, throw an {@link Error} on
 * a native thread, throw during a native allocation or while giving memory back, or block; and
 * close racing with native allocations, native threads and spills.
 *
 * <p>Each case states what must happen (the exact exception type and message, or a normal return
 * with the totals unchanged); after each, the JVM is alive and a fresh manager works.
 */
public class MisuseMatrixTest extends HardeningSupport {
    private static final long MAX_REQUEST = 1L << 62;

    private final ExecutorService pool = Executors.newCachedThreadPool();
    private final List<String> names = new ArrayList<String>();
    private final List<Body> bodies = new ArrayList<Body>();

    @After
    public void stopPool() throws InterruptedException {
        pool.shutdownNow();
        assertTrue(pool.awaitTermination(10, TimeUnit.SECONDS));
    }

    /** Thrown by a listener: an Error travels unchanged, even from a native thread. */
    static final class BudgetError extends Error {
        private static final long serialVersionUID = 1L;

        BudgetError(String message) {
            super(message);
        }
    }

    /** Blocks in reserve while armed, until released. */
    static final class Blocking extends Budget {
        final AtomicBoolean armed = new AtomicBoolean();
        final CountDownLatch entered = new CountDownLatch(1);
        final CountDownLatch release = new CountDownLatch(1);

        @Override
        void beforeReserve(long bytes) {
            if (armed.get()) {
                entered.countDown();
                try {
                    release.await(30, TimeUnit.SECONDS);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            }
        }
    }

    private void misuse(String name, Body body) {
        names.add(name);
        bodies.add(body);
    }

    @Test
    public void everyMisuseHasItsDocumentedOutcomeAndTheLibraryKeepsWorking() throws Exception {
        final Budget listener = new Budget();
        final NativeMemoryManager live = manager("live", listener);
        final NativeReservation held = live.newReservation("held", 4 * MIB);

        // ---- zero sizes ----------------------------------------------------------------------
        misuse("zero-byte reserve, grow, shrink and resize change nothing", () -> {
            NativeMemoryStats before = live.stats();
            try (NativeReservation r = live.newReservation("zero", 0)) {
                r.grow(0);
                r.shrink(0);
                r.resize(0);
                assertEquals(0, r.size());
            }
            held.grow(0);
            held.shrink(0);
            held.resize(held.size());
            assertUnchanged(before, live.stats());
        });
        misuse("spill, reclaim and releaseUnused of 0 bytes return 0", () -> {
            NativeMemoryStats before = live.stats();
            assertEquals(0, live.spill(0));
            assertEquals(0, live.reclaim(0));
            assertEquals(0, live.releaseUnused(0));
            assertUnchanged(before, live.stats());
        });
        misuse("native allocation of 0 bytes", () -> {
            IllegalArgumentException e = expect(IllegalArgumentException.class,
                    () -> Internals.allocate(live.handle(), "alloc", 0));
            assertEquals("cannot allocate 0 bytes", e.getMessage());
        });

        // ---- huge sizes ----------------------------------------------------------------------
        misuse("reserve Long.MAX_VALUE", () -> {
            long used = live.usedBytes();
            IllegalArgumentException e = expect(IllegalArgumentException.class,
                    () -> live.newReservation("huge", Long.MAX_VALUE));
            assertTooLarge(e, Long.MAX_VALUE);
            assertEquals("nothing held", used, live.usedBytes());
        });
        misuse("grow by Long.MAX_VALUE", () -> {
            IllegalArgumentException e = expect(IllegalArgumentException.class, () -> held.grow(Long.MAX_VALUE));
            assertTooLarge(e, Long.MAX_VALUE);
            assertEquals(4 * MIB, held.size());
        });
        misuse("resize to Long.MAX_VALUE", () -> {
            IllegalArgumentException e = expect(IllegalArgumentException.class, () -> held.resize(Long.MAX_VALUE));
            assertTooLarge(e, Long.MAX_VALUE - 4 * MIB);
            assertEquals(4 * MIB, held.size());
        });
        misuse("reserve 2^62 bytes (the largest request) beyond the listener's budget", () -> {
            Budget small = new Budget(64 * MIB);
            NativeMemoryManager m = manager("budget-64m", small);
            NativeOutOfMemoryException e = expect(NativeOutOfMemoryException.class,
                    () -> m.newReservation("huge", MAX_REQUEST));
            assertContains(e.getMessage(), "Failed to reserve 4.0 EiB for consumer 'jvm#");
            assertContains(e.getMessage(), "the reservation listener granted 64.0 MiB of the 4.0 EiB asked");
            assertEquals(0, m.usedBytes());
            assertEquals(small.reserved.get(), m.reservedBytes());
            m.close();
            assertEquals(0, small.reserved.get());
        });
        misuse("native allocation of Long.MAX_VALUE bytes", () -> {
            IllegalArgumentException e = expect(IllegalArgumentException.class,
                    () -> Internals.allocate(live.handle(), "alloc", Long.MAX_VALUE));
            assertEquals("cannot allocate 9223372036854775807 bytes aligned to 64: alignment must be a power of two"
                    + " and the size fit in isize", e.getMessage());
        });
        misuse("native allocation of 2^62 bytes the system cannot give", () -> {
            Budget unlimited = new Budget();
            NativeMemoryManager m = manager("no-system-memory", unlimited);
            NativeOutOfMemoryException e = expect(NativeOutOfMemoryException.class,
                    () -> Internals.allocate(m.handle(), "alloc", MAX_REQUEST));
            assertContains(e.getMessage(), "Failed to reserve 4.0 EiB for consumer 'allocations' in pool "
                    + "'root/alloc': the system allocator returned null.");
            assertEquals(0, m.usedBytes());
            assertEquals(0, m.stats().liveAllocations());
            assertEquals(unlimited.reserved.get(), m.reservedBytes());
            assertTrue("the grant went back down to one block", m.reservedBytes() <= BLOCK);
        });
        misuse("task limit of 0 bytes", () -> {
            NativeMemoryManager m = manager("limit-0", new Budget(), smallBlocks().withTaskLimit(0));
            NativeOutOfMemoryException e = expect(NativeOutOfMemoryException.class, () -> m.newReservation("p", 1));
            assertContains(e.getMessage(), "Failed to reserve 1 B for consumer 'jvm#");
            assertContains(e.getMessage(), "pool 'root' would exceed its limit of 0 B (used 0 B)");
        });

        // ---- over-release --------------------------------------------------------------------
        misuse("shrink an empty reservation", () -> {
            try (NativeReservation r = live.newReservation("empty", 0)) {
                IllegalArgumentException e = expect(IllegalArgumentException.class, () -> r.shrink(1));
                assertContains(e.getMessage(), "in pool 'root/empty' by 1 B (1 bytes): it holds 0 B (0 bytes)");
            }
        });
        misuse("double free of a native allocation", () -> {
            long address = Internals.allocate(live.handle(), "alloc", 64 * KIB);
            assertEquals(64 * KIB, Internals.free(live.handle(), address));
            NativeMemoryException e = expect(NativeMemoryException.class,
                    () -> Internals.free(live.handle(), address));
            assertEquals("pointer 0x" + Long.toHexString(address) + " is not a live allocation of memory manager"
                    + " 'live'", e.getMessage());
            assertEquals(0, live.stats().liveAllocations());
        });
        misuse("free of a native allocation through another manager", () -> {
            NativeMemoryManager other = manager("other", new Budget());
            long address = Internals.allocate(live.handle(), "alloc", 64 * KIB);
            NativeMemoryException e = expect(NativeMemoryException.class,
                    () -> Internals.free(other.handle(), address));
            assertEquals("pointer 0x" + Long.toHexString(address) + " is not a live allocation of memory manager"
                    + " 'other'", e.getMessage());
            assertEquals("the owner still has it", 1, live.stats().liveAllocations());
            assertEquals(64 * KIB, Internals.free(live.handle(), address));
        });
        misuse("free of address 0", () -> {
            IllegalArgumentException e = expect(IllegalArgumentException.class, () -> Internals.free(live.handle(), 0));
            assertEquals("address must not be 0", e.getMessage());
        });
        misuse("8 threads over-release one reservation at once", () -> {
            final NativeReservation r = live.newReservation("contended", 4 * MIB);
            final long usedBefore = live.usedBytes();
            final CountDownLatch go = new CountDownLatch(1);
            List<Future<Throwable>> shrinks = new ArrayList<Future<Throwable>>();
            for (int t = 0; t < 8; t++) {
                shrinks.add(pool.submit(() -> {
                    go.await();
                    try {
                        r.shrink(4 * MIB);
                        return null;
                    } catch (Throwable e) {
                        return e;
                    }
                }));
            }
            go.countDown();
            int succeeded = 0;
            for (Future<Throwable> f : shrinks) {
                Throwable e = f.get(10, TimeUnit.SECONDS);
                if (e == null) {
                    succeeded++;
                } else {
                    assertSame(IllegalArgumentException.class, e.getClass());
                    assertContains(e.getMessage(), "by 4.0 MiB (4194304 bytes): it holds 0 B (0 bytes)");
                }
            }
            assertEquals("exactly one shrink took the bytes", 1, succeeded);
            assertEquals(0, r.size());
            assertEquals(usedBefore - 4 * MIB, live.usedBytes());
            r.close();
        });

        // ---- stale handles and closed objects -------------------------------------------------
        final NativeMemoryManager gone = manager("gone", new Budget());
        final long goneHandle = gone.handle();
        final long goneReservation = Internals.handleOf(gone.newReservation("q", MIB));
        gone.close();
        misuse("a closed manager's reservation handle, natively", () -> {
            IllegalStateException e = expect(IllegalStateException.class,
                    () -> Internals.nativeGrow(goneReservation, 1));
            assertEquals("reservation handle " + hex(goneReservation) + " is stale: it was closed or destroyed",
                    e.getMessage());
        });
        misuse("a closed manager's handle to a native allocation", () -> {
            IllegalStateException e = expect(IllegalStateException.class,
                    () -> Internals.allocate(goneHandle, "alloc", 1));
            assertEquals("memory manager handle " + hex(goneHandle) + " is stale: it was closed or destroyed",
                    e.getMessage());
        });
        misuse("a closed manager's handle to native threads", () -> {
            IllegalStateException e = expect(IllegalStateException.class,
                    () -> Internals.startNativeChurn(goneHandle, "churn", 2, 1000, MIB, true, 1));
            assertEquals("memory manager handle " + hex(goneHandle) + " is stale: it was closed or destroyed",
                    e.getMessage());
        });
        misuse("closing twice, and a reservation after its manager", () -> {
            NativeMemoryManager m = manager("twice", new Budget());
            NativeReservation r = m.newReservation("p", MIB);
            m.close();
            m.close();
            r.close();
            r.close();
            IllegalStateException e = expect(IllegalStateException.class, r::size);
            assertEquals("NativeReservation 'jvm' in pool 'p' (handle " + hex(Internals.handleOf(r)) + ") is closed",
                    e.getMessage());
        });

        // ---- names ---------------------------------------------------------------------------
        misuse("control character in a pool name", () -> {
            IllegalArgumentException e = expect(IllegalArgumentException.class, () -> live.newReservation("a\nb", 1));
            assertEquals("pool name \"a\\nb\" must be non-empty and contain no '/' or control characters",
                    e.getMessage());
        });
        misuse("trailing slash in a pool path", () -> {
            IllegalArgumentException e = expect(IllegalArgumentException.class, () -> live.newReservation("a/", 1));
            assertEquals("pool path \"a/\" has an empty element", e.getMessage());
        });
        misuse("NUL, emoji and 100 KB names work", () -> {
            StringBuilder longName = new StringBuilder();
            while (longName.length() < 100_000) {
                longName.append("stage-3-task-17-");
            }
            for (String name : new String[] {"task\u0000one", "task \uD83D\uDE80 \u00e9", longName.toString()}) {
                Budget l = new Budget();
                try (NativeMemoryManager m = NativeMemoryManager.create(name, l, smallBlocks());
                        NativeReservation r = m.newReservation("p", MIB)) {
                    assertContains(m.usageReport(), "Native memory of '" + name + "'");
                    assertEquals(MIB, r.size());
                }
                assertEquals(0, l.reserved.get());
            }
        });

        // ---- listeners that break the contract -----------------------------------------------
        misuse("listener grants Long.MAX_VALUE", () -> {
            Budget greedy = new Budget() {
                @Override
                public long reserve(long bytes) {
                    super.reserve(bytes);
                    reserved.addAndGet(Long.MAX_VALUE - bytes);
                    return Long.MAX_VALUE;
                }
            };
            NativeMemoryManager m = manager("greedy", greedy);
            NativeMemoryException e = expect(NativeMemoryException.class, () -> m.newReservation("p", 10));
            assertEquals("reservation listener broke its contract: asked for 1048576 bytes, granted "
                    + "9223372036854775807; the grant is kept and will be given back", e.getMessage());
            assertEquals(0, m.usedBytes());
            assertEquals("the whole grant is counted", Long.MAX_VALUE, m.reservedBytes());
            m.close();
            assertEquals("and all of it given back", 0, greedy.reserved.get());
        });
        misuse("listener throws an Error on a native thread", () -> {
            final BudgetError thrown = new BudgetError("no budget for native threads");
            Budget l = new Budget() {
                @Override
                void beforeReserve(long bytes) {
                    throw thrown;
                }
            };
            NativeMemoryManager m = manager("native-error", l);
            BudgetError e = expect(BudgetError.class,
                    () -> Internals.growFromNativeThreads(m.handle(), "native", 2, 4, MIB));
            assertSame("the very Error, rethrown on the Java caller", thrown, e);
            assertEquals(0, m.usedBytes());
            assertEquals(0, m.reservedBytes());
        });
        misuse("listener throws during a native allocation", () -> {
            final IllegalStateException thrown = new IllegalStateException("executor is shutting down");
            Budget l = new Budget() {
                @Override
                void beforeReserve(long bytes) {
                    throw thrown;
                }
            };
            NativeMemoryManager m = manager("alloc-fails", l);
            NativeMemoryException e = expect(NativeMemoryException.class,
                    () -> Internals.allocate(m.handle(), "alloc", MIB));
            assertEquals("reservation listener failed to reserve 1048576 bytes: "
                    + "java.lang.IllegalStateException: executor is shutting down", e.getMessage());
            assertSame(thrown, e.getCause());
            assertEquals(0, m.usedBytes());
            assertEquals(0, m.stats().liveAllocations());
        });
        misuse("listener throws while Spark takes memory back (reclaim)", () -> {
            final IllegalStateException thrown = new IllegalStateException("consumer released");
            final AtomicBoolean failing = new AtomicBoolean();
            Budget l = new Budget() {
                @Override
                void beforeUnreserve(long bytes) {
                    if (failing.get()) {
                        throw thrown;
                    }
                }
            };
            NativeMemoryManager m = manager("unreserve-fails", l);
            Internals.registerSpiller(m.handle(), "sort", 6 * MIB, 0);
            failing.set(true);
            NativeMemoryException e = expect(NativeMemoryException.class, () -> m.reclaim(4 * MIB));
            // What the spill frees stays in the cushion until the reclaim hands back exactly the
            // bytes asked for, so the failure is that hand-back, with the listener's exception kept
            // as the cause.
            assertEquals("reservation listener failed to unreserve 4194304 bytes: "
                    + "java.lang.IllegalStateException: consumer released", e.getMessage());
            assertSame(thrown, e.getCause());
            assertEquals("the spiller freed its bytes", 2 * MIB, m.usedBytes());
            assertEquals("they stay reserved", 6 * MIB, m.reservedBytes());
            assertEquals(6 * MIB, l.reserved.get());
            failing.set(false);
            assertEquals("offered again", 4 * MIB, m.reclaim(4 * MIB));
            assertEquals(l.reserved.get(), m.reservedBytes());
        });
        misuse("listener blocks: read-outs, spills, shrinks and other managers go on", () -> {
            final Blocking l = new Blocking();
            final NativeMemoryManager m = manager("blocked", l);
            Internals.registerSpiller(m.handle(), "sort", 2 * MIB, 0);
            final NativeReservation r = m.newReservation("p", 1000 * KIB);
            l.armed.set(true);
            Future<?> blocked = pool.submit(() -> {
                m.newReservation("slow", 8 * MIB).close();
                return null;
            });
            assertTrue(l.entered.await(10, TimeUnit.SECONDS));
            Future<?> others = pool.submit(() -> {
                for (int i = 0; i < 1000; i++) {
                    m.usedBytes();
                    m.stats();
                    m.usageReport();
                    m.spill(MIB);
                    m.releaseUnused(KIB);
                    r.shrink(1);
                    freshManagerWorks("(while a listener blocks)");
                }
                return null;
            });
            others.get(30, TimeUnit.SECONDS); // would time out if a lock were held across the upcall
            assertFalse(blocked.isDone());
            l.release.countDown();
            blocked.get(10, TimeUnit.SECONDS);
            r.close();
            assertEquals(0, m.usedBytes());
            m.close();
            assertEquals(0, l.reserved.get());
        });

        // ---- close racing with work ----------------------------------------------------------
        misuse("close while Java threads allocate natively", () -> {
            final Budget l = new Budget();
            final NativeMemoryManager m = manager("allocating", l);
            closeUnderLoad(m, () -> {
                long a = Internals.allocate(m.handle(), "alloc", 256 * KIB);
                Internals.free(m.handle(), a);
            });
            assertEquals(0, l.reserved.get());
        });
        misuse("close while spills run (a slow native spiller)", () -> {
            final Budget l = new Budget();
            final NativeMemoryManager m = manager("spilling", l);
            Internals.registerSpiller(m.handle(), "sort", 64 * MIB, 2);
            closeUnderLoad(m, () -> {
                m.spill(MIB);
                m.reclaim(MIB);
            });
            assertEquals(0, l.reserved.get());
        });
        misuse("close while native threads grow, shrink, allocate and spill", () -> {
            final Budget l = new Budget();
            final NativeMemoryManager m = manager("churning", l);
            final long churn = Internals.startNativeChurn(m.handle(), "churn", 4, 60_000, 8 * MIB, true, 42);
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
            while (Internals.churnOps(churn) < 200) {
                assertTrue("native threads made progress", System.nanoTime() < deadline);
                Thread.sleep(1);
            }
            long started = System.nanoTime();
            m.close();
            assertTrue("close waited for one step per thread, not for the 60 s churn",
                    System.nanoTime() - started < TimeUnit.SECONDS.toNanos(5));
            assertEquals("every byte the threads reserved came back", 0, l.reserved.get());
            IllegalStateException e = expect(IllegalStateException.class, () -> Internals.churnOps(churn));
            assertEquals("native churn handle " + hex(churn) + " is stale: it was closed or destroyed",
                    e.getMessage());
        });
        misuse("a native thread's upcall closes the manager", () -> {
            final AtomicReference<NativeMemoryManager> self = new AtomicReference<NativeMemoryManager>();
            final AtomicInteger closes = new AtomicInteger();
            Budget l = new Budget() {
                @Override
                void beforeReserve(long bytes) {
                    NativeMemoryManager m = self.get();
                    if (m != null && reserveCalls.get() >= 3 && closes.incrementAndGet() == 1) {
                        m.close(); // on a native thread, inside its call: deferred to its return
                    }
                }
            };
            NativeMemoryManager m = manager("closed-from-native", l, smallBlocks().withCloseTimeoutMillis(30_000));
            self.set(m);
            long started = System.nanoTime();
            try {
                Internals.growFromNativeThreads(m.handle(), "native", 2, 4, MIB);
            } catch (IllegalStateException closedBeforeTheOtherThreadEntered) {
                String msg = closedBeforeTheOtherThreadEntered.getMessage();
                assertTrue(msg, msg.contains("'closed-from-native'") || msg.contains("is stale"));
            }
            assertTrue("nobody waited for itself", System.nanoTime() - started < TimeUnit.SECONDS.toNanos(5));
            assertTrue(m.isClosed());
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
            while (l.reserved.get() != 0) {
                assertTrue("the deferred close gave everything back", System.nanoTime() < deadline);
                Thread.sleep(5);
            }
        });

        // ---- run the table -------------------------------------------------------------------
        for (int i = 0; i < bodies.size(); i++) {
            String name = names.get(i);
            try {
                bodies.get(i).run();
            } catch (Throwable t) {
                AssertionError e = new AssertionError("misuse '" + name + "': " + t);
                e.initCause(t);
                throw e;
            }
            freshManagerWorks(name);
        }
        System.out.println("MisuseMatrixTest: " + bodies.size() + " misuse cases, each followed by a working fresh"
                + " manager");
        assertEquals("the live objects survived every case", 4 * MIB, held.size());
        assertEquals(listener.reserved.get(), live.reservedBytes());
        held.close();
        live.close();
        assertEquals(0, listener.reserved.get());
    }

    /** Bytes and calls are as they were (spills, allocations and listener calls included). */
    private static void assertUnchanged(NativeMemoryStats before, NativeMemoryStats after) {
        assertEquals(before.usedBytes(), after.usedBytes());
        assertEquals(before.reservedBytes(), after.reservedBytes());
        assertEquals(before.reserveCalls(), after.reserveCalls());
        assertEquals(before.unreserveCalls(), after.unreserveCalls());
        assertEquals(before.spillCount(), after.spillCount());
        assertEquals(before.liveAllocations(), after.liveAllocations());
    }

    private static void assertTooLarge(IllegalArgumentException e, long bytes) {
        assertContains(e.getMessage(), "request of " + bytes + " bytes for 'jvm#");
        assertContains(e.getMessage(), "' exceeds the maximum of 4611686018427387904 bytes");
    }

    /**
     * Four threads run {@code work} in a loop (plus grow/shrink) while the manager closes: the only
     * failure they may see is {@link IllegalStateException} (closed or stale), and close returns.
     */
    private void closeUnderLoad(final NativeMemoryManager m, final Body work) throws Exception {
        final AtomicInteger rounds = new AtomicInteger();
        final CountDownLatch running = new CountDownLatch(4);
        List<Future<Throwable>> workers = new ArrayList<Future<Throwable>>();
        for (int t = 0; t < 4; t++) {
            workers.add(pool.submit(new Callable<Throwable>() {
                @Override
                public Throwable call() {
                    boolean counted = false;
                    try (NativeReservation r = m.newReservation("load", 0)) {
                        while (true) {
                            r.grow(3 * MIB);
                            work.run();
                            r.shrink(3 * MIB);
                            rounds.incrementAndGet();
                            if (!counted) {
                                counted = true;
                                running.countDown();
                            }
                        }
                    } catch (IllegalStateException closed) {
                        return null;
                    } catch (Throwable other) {
                        return other;
                    } finally {
                        if (!counted) {
                            running.countDown();
                        }
                    }
                }
            }));
        }
        assertTrue(running.await(10, TimeUnit.SECONDS));
        m.close();
        for (Future<Throwable> f : workers) {
            Throwable unexpected = f.get(10, TimeUnit.SECONDS);
            if (unexpected != null) {
                throw new AssertionError("a call racing with close failed with " + unexpected, unexpected);
            }
        }
        assertTrue(rounds.get() > 0);
    }
}
