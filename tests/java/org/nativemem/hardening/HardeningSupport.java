package org.nativemem.hardening;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.lang.management.ManagementFactory;
import java.lang.management.ThreadInfo;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;

import org.junit.After;
import org.junit.Before;
import org.nativemem.NativeLibraryLoader;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeReservation;
import org.nativemem.ReservationListener;

/**
 * Base of the hardening tests: closes the managers a test creates, checks afterwards that no
 * native handle leaked, and offers a listener with a budget, exact-exception checks, the "a fresh
 * manager still works" check and thread dumps for watchdogs.
 */
abstract class HardeningSupport {
    static final long KIB = 1L << 10;
    static final long MIB = 1L << 20;
    /** The block of {@link #smallBlocks()}: tests reason in whole MiB. */
    static final long BLOCK = MIB;

    private final List<NativeMemoryManager> managers = new ArrayList<NativeMemoryManager>();
    private long[] liveBefore;

    @Before
    public void recordLiveHandles() {
        NativeLibraryLoader.load();
        liveBefore = Internals.liveHandles();
    }

    @After
    public void closeManagersAndCheckHandles() throws InterruptedException {
        for (NativeMemoryManager m : managers) {
            try {
                m.close();
            } catch (RuntimeException e) {
                // The test decided how close should behave; only leaks matter here.
            }
        }
        long[] now = Internals.liveHandles();
        long deadline = System.nanoTime() + 10_000_000_000L;
        while ((now[0] != liveBefore[0] || now[1] != liveBefore[1]) && System.nanoTime() < deadline) {
            Thread.sleep(10);
            now = Internals.liveHandles();
        }
        assertEquals("live manager handles after the test", liveBefore[0], now[0]);
        assertEquals("live reservation handles after the test", liveBefore[1], now[1]);
    }

    /**
     * 1 MiB blocks and exact accounting (reservation quantum 0, opt-in: the default is the 1 MiB
     * quantum). The tests built on it pin used and peak to the byte after every step, which is
     * their point; the quantum has its own tests (ReservationQuantumTest, and the default in
     * NativeMemoryConfigTest and ReservationQuantumTest).
     */
    static NativeMemoryConfig smallBlocks() {
        return NativeMemoryConfig.defaults().withReservationBlockSize(BLOCK).withReservationQuantum(0);
    }

    NativeMemoryManager track(NativeMemoryManager m) {
        managers.add(m);
        return m;
    }

    NativeMemoryManager manager(String name, ReservationListener listener) {
        return manager(name, listener, smallBlocks());
    }

    NativeMemoryManager manager(String name, ReservationListener listener, NativeMemoryConfig config) {
        return track(NativeMemoryManager.create(name, listener, config));
    }

    static String hex(long handle) {
        return String.format("0x%016x", handle);
    }

    /** Fails unless {@code call} throws exactly {@code type}; returns the exception. */
    static <T extends Throwable> T expect(Class<T> type, Body call) {
        try {
            call.run();
        } catch (Throwable t) {
            if (t.getClass() != type) {
                AssertionError e = new AssertionError("expected " + type.getName() + " but got " + t);
                e.initCause(t);
                throw e;
            }
            return type.cast(t);
        }
        fail("expected " + type.getName() + " but nothing was thrown");
        return null;
    }

    static void assertContains(String haystack, String needle) {
        assertTrue("expected <" + haystack + "> to contain <" + needle + ">",
                haystack != null && haystack.contains(needle));
    }

    /** A new manager reserves, reports and closes with every byte back: the library still works. */
    static void freshManagerWorks(String after) {
        Budget l = new Budget();
        try (NativeMemoryManager m = NativeMemoryManager.create("fresh after " + after, l, smallBlocks());
                NativeReservation r = m.newReservation("ok", 3 * MIB)) {
            assertEquals(after, 3 * MIB, m.usedBytes());
            assertEquals(after, 3 * MIB, r.size());
            assertEquals(after, l.reserved.get(), m.reservedBytes());
        }
        assertEquals(after, 0, l.reserved.get());
    }

    /** Every thread of this JVM with its stack and the locks it holds or waits for. */
    static String threadDump() {
        StringBuilder sb = new StringBuilder();
        for (ThreadInfo t : ManagementFactory.getThreadMXBean().dumpAllThreads(true, true)) {
            sb.append('"').append(t.getThreadName()).append("\" ").append(t.getThreadState());
            if (t.getLockName() != null) {
                sb.append(" on ").append(t.getLockName());
            }
            if (t.getLockOwnerName() != null) {
                sb.append(" owned by \"").append(t.getLockOwnerName()).append('"');
            }
            sb.append('\n');
            for (StackTraceElement e : t.getStackTrace()) {
                sb.append("    at ").append(e).append('\n');
            }
            sb.append('\n');
        }
        return sb.toString();
    }

    /**
     * A listener with a budget of {@code capacity} bytes that records every call; override
     * {@link #beforeReserve} / {@link #beforeUnreserve} to block, throw or re-enter.
     */
    static class Budget implements ReservationListener {
        final long capacity;
        final AtomicLong reserved = new AtomicLong();
        final AtomicInteger reserveCalls = new AtomicInteger();

        Budget() {
            this(Long.MAX_VALUE);
        }

        Budget(long capacity) {
            this.capacity = capacity;
        }

        void beforeReserve(long bytes) {
        }

        void beforeUnreserve(long bytes) {
        }

        @Override
        public long reserve(long bytes) {
            reserveCalls.incrementAndGet();
            if (bytes <= 0) {
                throw new AssertionError("reserve(" + bytes + ")");
            }
            beforeReserve(bytes);
            while (true) {
                long cur = reserved.get();
                long grant = Math.min(bytes, capacity - cur);
                if (reserved.compareAndSet(cur, cur + grant)) {
                    return grant;
                }
            }
        }

        @Override
        public void unreserve(long bytes) {
            if (bytes <= 0) {
                throw new AssertionError("unreserve(" + bytes + ")");
            }
            beforeUnreserve(bytes);
            if (reserved.addAndGet(-bytes) < 0) {
                throw new AssertionError("unreserve(" + bytes + ") gave back more than was granted");
            }
        }
    }

    interface Body {
        void run() throws Throwable;
    }
}
