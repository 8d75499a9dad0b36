package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.ArrayList;
import java.util.List;
import org.junit.After;
import org.junit.Before;

/**
 * Base of the tests against the real library: tracks the managers a test creates, closes them
 * after it, and checks that no native handle leaked.
 */
abstract class NativeTestSupport {
    static final long KIB = 1L << 10;
    static final long MIB = 1L << 20;
    /** A small block so tests reason in whole MiB. */
    static final long BLOCK = MIB;

    private final List<NativeMemoryManager> managers = new ArrayList<NativeMemoryManager>();
    private long[] liveBefore;

    @Before
    public void recordLiveHandles() {
        NativeLibraryLoader.load();
        liveBefore = NativeMemoryManager.nativeLiveHandles();
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
        long[] now = NativeMemoryManager.nativeLiveHandles();
        long deadline = System.nanoTime() + 10_000_000_000L;
        while ((now[0] != liveBefore[0] || now[1] != liveBefore[1]) && System.nanoTime() < deadline) {
            Thread.sleep(10);
            now = NativeMemoryManager.nativeLiveHandles();
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
    NativeMemoryConfig smallBlocks() {
        return NativeMemoryConfig.defaults().withReservationBlockSize(BLOCK).withReservationQuantum(0);
    }

    NativeMemoryManager track(NativeMemoryManager m) {
        managers.add(m);
        return m;
    }

    NativeMemoryManager manager(String name, ReservationListener listener) {
        return track(NativeMemoryManager.create(name, listener, smallBlocks()));
    }

    NativeMemoryManager manager(String name, ReservationListener listener, NativeMemoryConfig config) {
        return track(NativeMemoryManager.create(name, listener, config));
    }

    static String hex(long handle) {
        return String.format("0x%016x", handle);
    }

    /** Fails unless {@code call} throws exactly {@code type}; returns the exception. */
    static <T extends Throwable> T expect(Class<T> type, ThrowingRunnable call) {
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

    /** Polls {@code condition} for up to 10 s. */
    static void eventually(String what, Condition condition) throws InterruptedException {
        long deadline = System.nanoTime() + 10_000_000_000L;
        while (!condition.holds()) {
            if (System.nanoTime() > deadline) {
                fail("timed out waiting for: " + what);
            }
            Thread.sleep(5);
        }
    }

    interface ThrowingRunnable {
        void run() throws Throwable;
    }

    interface Condition {
        boolean holds();
    }
}
