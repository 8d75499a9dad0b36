package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.List;
import org.junit.Test;

/**
 * Every misuse, as a table: each case states the exception type and message, and after each
 * case a fresh manager must still work (the library is not left in a bad state).
 */
public class MisuseTest extends NativeTestSupport {

    /** One misuse: what to do, what must be thrown, with which message. */
    private static final class Case {
        final String name;
        final Class<? extends Throwable> type;
        final String message;
        final boolean exact;
        final ThrowingRunnable call;

        Case(String name, Class<? extends Throwable> type, String message, boolean exact, ThrowingRunnable call) {
            this.name = name;
            this.type = type;
            this.message = message;
            this.exact = exact;
            this.call = call;
        }
    }

    private final List<Case> cases = new ArrayList<Case>();

    private void exactly(String name, Class<? extends Throwable> type, String message, ThrowingRunnable call) {
        cases.add(new Case(name, type, message, true, call));
    }

    private void containing(String name, Class<? extends Throwable> type, String message, ThrowingRunnable call) {
        cases.add(new Case(name, type, message, false, call));
    }

    @Test
    public void everyMisuseThrowsTheDocumentedExceptionAndLeavesTheLibraryWorking() {
        final CountingListener listener = new CountingListener();
        final NativeMemoryConfig config = smallBlocks();

        // A live manager and reservation to misuse, and a closed manager / reservation.
        final NativeMemoryManager live = manager("live", listener);
        final NativeReservation res = live.newReservation("p", MIB);
        final NativeMemoryManager closed = manager("gone", new CountingListener());
        final long staleHandle = closed.handle();
        final NativeReservation closedRes = closed.newReservation("q", 10);
        closed.close();
        final NativeReservation released = live.newReservation("p", 1);
        released.close();
        final long reservationHandle = reservationHandleOf(live, "p");

        // ---- creation -------------------------------------------------------------------
        exactly("null name", NullPointerException.class, "name",
                () -> NativeMemoryManager.create(null, listener));
        exactly("null listener", NullPointerException.class, "listener",
                () -> NativeMemoryManager.create("x", null));
        exactly("null config", NullPointerException.class, "config",
                () -> NativeMemoryManager.create("x", listener, null));
        exactly("zero block", IllegalArgumentException.class,
                "reservation block size must be between 1 and 4611686018427387904 bytes, got 0",
                () -> NativeMemoryConfig.defaults().withReservationBlockSize(0));
        exactly("huge block", IllegalArgumentException.class,
                "reservation block size must be between 1 and 4611686018427387904 bytes, got 4611686018427387905",
                () -> NativeMemoryConfig.defaults().withReservationBlockSize((1L << 62) + 1));
        exactly("negative task limit", IllegalArgumentException.class, "task limit must be >= 0 bytes, got -5",
                () -> NativeMemoryConfig.defaults().withTaskLimit(-5));
        exactly("negative close timeout", IllegalArgumentException.class, "close timeout must be >= 0 ms, got -1",
                () -> NativeMemoryConfig.defaults().withCloseTimeoutMillis(-1));
        // The native side validates too (the natives are reachable only from this package).
        exactly("native: zero block", IllegalArgumentException.class,
                "reservation block size must be > 0 bytes, got 0",
                () -> NativeMemoryManager.nativeCreate("x", listener, 0, -1, 0, 0));
        exactly("native: bad task limit", IllegalArgumentException.class, "task limit must be >= 0, got -2",
                () -> NativeMemoryManager.nativeCreate("x", listener, MIB, -2, 0, 0));
        exactly("native: null name", NullPointerException.class, "name must not be null",
                () -> NativeMemoryManager.nativeCreate(null, listener, MIB, -1, 0, 0));
        exactly("native: null listener", NullPointerException.class, "listener must not be null",
                () -> NativeMemoryManager.nativeCreate("x", null, MIB, -1, 0, 0));
        exactly("native: negative quantum", IllegalArgumentException.class,
                "reservation quantum must be >= 0, got -3",
                () -> NativeMemoryManager.nativeCreate("x", listener, MIB, -1, 0, -3));

        // ---- arguments ------------------------------------------------------------------
        exactly("reserve negative", IllegalArgumentException.class, "bytes must be >= 0, got -1",
                () -> live.newReservation("p", -1));
        exactly("reserve empty path element", IllegalArgumentException.class,
                "pool path \"a//b\" has an empty element", () -> live.newReservation("a//b", 1));
        exactly("reserve null path", NullPointerException.class, "poolPath", () -> live.newReservation(null, 1));
        exactly("reserve null consumer", NullPointerException.class, "consumer",
                () -> live.newReservation("p", null, 1));
        exactly("grow negative", IllegalArgumentException.class, "bytes must be >= 0, got -7", () -> res.grow(-7));
        exactly("shrink negative", IllegalArgumentException.class, "bytes must be >= 0, got -7",
                () -> res.shrink(-7));
        exactly("resize negative", IllegalArgumentException.class, "newSize must be >= 0, got -1",
                () -> res.resize(-1));
        containing("shrink more than held", IllegalArgumentException.class,
                "in pool 'root/p' by 2.0 MiB (2097152 bytes): it holds 1.0 MiB (1048576 bytes)",
                () -> res.shrink(2 * MIB));
        exactly("spill negative", IllegalArgumentException.class, "bytes must be >= 0, got -1", () -> live.spill(-1));
        exactly("reclaim negative", IllegalArgumentException.class, "bytes must be >= 0, got -1",
                () -> live.reclaim(-1));
        exactly("releaseUnused negative", IllegalArgumentException.class, "maxBytes must be >= 0, got -1",
                () -> live.releaseUnused(-1));
        containing("free of an unknown address", NativeMemoryException.class,
                "pointer 0x40 is not a live allocation of memory manager 'live'",
                () -> NativeTesting.free(live.handle(), 64));

        // ---- use after close ------------------------------------------------------------
        String closedMsg = "NativeMemoryManager 'gone' (handle " + hex(staleHandle) + ") is closed";
        exactly("usedBytes after close", IllegalStateException.class, closedMsg, () -> closed.usedBytes());
        exactly("usageReport after close", IllegalStateException.class, closedMsg, () -> closed.usageReport());
        exactly("stats after close", IllegalStateException.class, closedMsg, () -> closed.stats());
        exactly("spill after close", IllegalStateException.class, closedMsg, () -> closed.spill(1));
        exactly("reserve after close", IllegalStateException.class, closedMsg, () -> closed.newReservation("p", 1));
        exactly("handle after close", IllegalStateException.class, closedMsg, () -> closed.handle());
        exactly("reservation grow after manager close", IllegalStateException.class, closedMsg,
                () -> closedRes.grow(1));
        containing("reservation grow after its close", IllegalStateException.class,
                "NativeReservation 'jvm' in pool 'p' (handle 0x02", () -> released.grow(1));

        // ---- stale, double-destroyed, forged and wrong-kind handles (the natives directly) --
        String stale = "memory manager handle " + hex(staleHandle) + " is stale: it was closed or destroyed";
        exactly("stale handle", IllegalStateException.class, stale,
                () -> NativeMemoryManager.nativeUsedBytes(staleHandle));
        exactly("double destroy", IllegalStateException.class, stale,
                () -> NativeMemoryManager.nativeClose(staleHandle));
        exactly("stale handle into another native library", IllegalStateException.class, stale,
                () -> NativeTesting.registerSpiller(staleHandle, "s", 1, 0));
        exactly("null handle", IllegalStateException.class, "null memory manager handle (0x0)",
                () -> NativeMemoryManager.nativeSpill(0, 1));
        exactly("made-up small handle", IllegalStateException.class,
                "0x0000000000003039 is not a memory manager handle",
                () -> NativeMemoryManager.nativeReservedBytes(12345));
        exactly("negative handle", IllegalStateException.class,
                "0xffffffffffffffff is not a memory manager handle",
                () -> NativeMemoryManager.nativeUsageReport(-1));
        final long forged = (1L << 56) | (1L << 24) | 0xABCDEL;
        exactly("forged slot", IllegalStateException.class,
                "memory manager handle " + hex(forged) + " is unknown: it was never issued by this process",
                () -> NativeMemoryManager.nativeStats(forged));
        final long future = live.handle() + (1000L << 24);
        exactly("forged generation", IllegalStateException.class,
                "memory manager handle " + hex(future) + " is unknown: it was never issued by this process",
                () -> NativeMemoryManager.nativePeakBytes(future));
        exactly("reservation handle as manager handle", IllegalStateException.class,
                hex(reservationHandle) + " is not a memory manager handle",
                () -> NativeMemoryManager.nativeUsedBytes(reservationHandle));
        exactly("manager handle as reservation handle", IllegalStateException.class,
                hex(live.handle()) + " is not a reservation handle",
                () -> NativeReservation.nativeSize(live.handle()));
        exactly("released reservation handle", IllegalStateException.class,
                "reservation handle " + hex(reservationHandle) + " is stale: it was closed or destroyed",
                () -> {
                    NativeReservation.nativeClose(reservationHandle);
                    NativeReservation.nativeGrow(reservationHandle, 1);
                });

        // ---- limits ---------------------------------------------------------------------
        final NativeMemoryManager tiny = manager("tiny", new CountingListener(), config.withTaskLimit(100));
        containing("over the task limit", NativeOutOfMemoryException.class,
                "pool 'root' would exceed its limit of 100 B (used 0 B)", () -> tiny.newReservation("p", 101));

        int checked = 0;
        for (Case c : cases) {
            Throwable t = null;
            try {
                c.call.run();
            } catch (Throwable e) {
                t = e;
            }
            if (t == null) {
                throw new AssertionError(c.name + ": expected " + c.type.getName() + " but nothing was thrown");
            }
            if (t.getClass() != c.type) {
                AssertionError e = new AssertionError(c.name + ": expected " + c.type.getName() + " but got " + t);
                e.initCause(t);
                throw e;
            }
            if (c.exact) {
                assertEquals(c.name, c.message, t.getMessage());
            } else {
                assertTrue(c.name + ": <" + t.getMessage() + "> should contain <" + c.message + ">",
                        t.getMessage() != null && t.getMessage().contains(c.message));
            }
            freshManagerWorks(c.name);
            checked++;
        }
        assertEquals(cases.size(), checked);
        assertTrue("the table covers the misuses", checked >= 40);

        // The live objects survived every case.
        assertEquals(MIB, res.size());
        res.close();
    }

    /** The handle of a new 1-byte reservation (released by one of the cases). */
    private static long reservationHandleOf(NativeMemoryManager m, String pool) {
        return m.newReservation(pool, 1).nativeHandle();
    }

    private static void freshManagerWorks(String afterCase) {
        CountingListener l = new CountingListener();
        try (NativeMemoryManager m = NativeMemoryManager.create("fresh after " + afterCase, l,
                NativeMemoryConfig.defaults().withReservationBlockSize(MIB));
                NativeReservation r = m.newReservation("ok", 3 * MIB)) {
            assertEquals(afterCase, 3 * MIB, m.usedBytes());
            assertEquals(afterCase, 3 * MIB, r.size());
        }
        assertEquals(afterCase, 0, l.reserved.get());
    }
}
