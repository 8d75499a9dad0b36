package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertTrue;

import java.io.IOException;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.Test;

/** A listener that throws or breaks its contract: the caller sees it, the accounting stays exact. */
public class ListenerFailureTest extends NativeTestSupport {

    /** Throws {@code failure} from reserve while it is set. */
    static class ThrowingListener extends CountingListener {
        final AtomicReference<Throwable> reserveFailure = new AtomicReference<Throwable>();
        final AtomicReference<Throwable> unreserveFailure = new AtomicReference<Throwable>();

        @Override
        void beforeReserve(long bytes) {
            Throwable t = reserveFailure.get();
            if (t != null) {
                ListenerFailureTest.<RuntimeException>sneakyThrow(t);
            }
        }

        @Override
        void beforeUnreserve(long bytes) {
            Throwable t = unreserveFailure.get();
            if (t != null) {
                ListenerFailureTest.<RuntimeException>sneakyThrow(t);
            }
        }
    }

    @SuppressWarnings("unchecked")
    static <T extends Throwable> void sneakyThrow(Throwable t) throws T {
        throw (T) t;
    }

    static final class BudgetError extends Error {
        private static final long serialVersionUID = 1L;

        BudgetError(String message) {
            super(message);
        }
    }

    @Test
    public void runtimeExceptionFromReserveIsTheCauseAndNothingIsCounted() {
        ThrowingListener listener = new ThrowingListener();
        NativeMemoryManager m = manager("throws", listener);
        NativeReservation r = m.newReservation("p", 0);
        IllegalStateException thrown = new IllegalStateException("budget service down");
        listener.reserveFailure.set(thrown);
        NativeMemoryException e = expect(NativeMemoryException.class, () -> r.grow(MIB / 2));
        assertSame("the listener's exception is the cause", thrown, e.getCause());
        assertEquals("reservation listener failed to reserve 1048576 bytes: "
                + "java.lang.IllegalStateException: budget service down", e.getMessage());
        assertEquals(0, r.size());
        assertEquals(0, m.usedBytes());
        assertEquals(0, m.reservedBytes());
        assertEquals(0, listener.reserved.get());

        listener.reserveFailure.set(null);
        r.grow(MIB / 2);
        assertEquals(MIB / 2, m.usedBytes());
        assertEquals(MIB, m.reservedBytes());
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void checkedExceptionFromReserveIsWrappedWithCause() {
        ThrowingListener listener = new ThrowingListener();
        NativeMemoryManager m = manager("checked", listener);
        IOException thrown = new IOException("disk quota");
        listener.reserveFailure.set(thrown);
        NativeMemoryException e = expect(NativeMemoryException.class, () -> m.newReservation("p", 1));
        assertSame(thrown, e.getCause());
        assertContains(e.getMessage(), "java.io.IOException: disk quota");
        assertEquals(0, m.usedBytes());
    }

    @Test
    public void errorFromReserveIsRethrownUnchanged() {
        ThrowingListener listener = new ThrowingListener();
        NativeMemoryManager m = manager("error", listener);
        BudgetError thrown = new BudgetError("Unable to acquire 1048576 bytes of memory");
        listener.reserveFailure.set(thrown);
        BudgetError e = expect(BudgetError.class, () -> m.newReservation("p", 1));
        assertSame(thrown, e);
        assertEquals(0, m.usedBytes());
        assertEquals(0, m.reservedBytes());
    }

    @Test
    public void negativeGrantIsAContractErrorAndNothingIsCounted() {
        CountingListener listener = new CountingListener() {
            @Override
            public long reserve(long bytes) {
                super.reserve(bytes);
                reserved.addAndGet(-bytes);
                return -1;
            }
        };
        NativeMemoryManager m = manager("negative", listener);
        NativeMemoryException e = expect(NativeMemoryException.class, () -> m.newReservation("p", 10));
        assertEquals("reservation listener failed to reserve 1048576 bytes: ReservationListener.reserve(1048576) "
                + "returned -1; it must return the bytes granted, between 0 and 1048576", e.getMessage());
        assertNull(e.getCause());
        assertEquals(0, m.usedBytes());
        assertEquals(0, m.reservedBytes());
    }

    @Test
    public void grantAboveTheRequestIsKeptAndGivenBack() {
        final long extra = 5;
        CountingListener listener = new CountingListener() {
            @Override
            public long reserve(long bytes) {
                long granted = super.reserve(bytes);
                reserved.addAndGet(extra);
                return granted + extra;
            }
        };
        NativeMemoryManager m = manager("greedy", listener);
        NativeMemoryException e = expect(NativeMemoryException.class, () -> m.newReservation("p", 10));
        assertEquals("reservation listener broke its contract: asked for 1048576 bytes, granted 1048581; "
                + "the grant is kept and will be given back", e.getMessage());
        assertEquals(0, m.usedBytes());
        assertEquals("the whole grant is counted", MIB + extra, m.reservedBytes());
        assertEquals(MIB + extra, listener.reserved.get());
        m.close();
        assertEquals("and given back at close", 0, listener.reserved.get());
    }

    @Test
    public void unreserveThrowingAtCloseFailsCloseWithCauseButCloses() {
        ThrowingListener listener = new ThrowingListener();
        NativeMemoryManager m = manager("stuck", listener);
        NativeReservation r = m.newReservation("p", 3 * MIB);
        RuntimeException thrown = new RuntimeException("consumer already freed");
        listener.unreserveFailure.set(thrown);
        r.close(); // hands surplus back: fails, logged natively; the bytes stay reserved
        assertEquals(3 * MIB, m.reservedBytes());
        NativeMemoryException e = expect(NativeMemoryException.class, m::close);
        assertSame(thrown, e.getCause());
        assertContains(e.getMessage(), "reservation listener failed to unreserve 3145728 bytes");
        assertTrue(m.isClosed());
        assertNull(m.closeReport());
        expect(IllegalStateException.class, m::usedBytes);
        expect(IllegalStateException.class, () -> NativeMemoryManager.nativeUsedBytes(m.nativeHandle()));
        m.close();
        assertEquals("the listener kept its bytes", 3 * MIB, listener.reserved.get());
    }

    @Test
    public void unreserveThrowingOnShrinkKeepsTheBytesReservedUntilLater() {
        ThrowingListener listener = new ThrowingListener();
        NativeMemoryManager m = manager("shrinky", listener);
        NativeReservation r = m.newReservation("p", 5 * MIB);
        RuntimeException thrown = new RuntimeException("not now");
        listener.unreserveFailure.set(thrown);
        NativeMemoryException e = expect(NativeMemoryException.class, () -> r.shrink(4 * MIB));
        assertSame(thrown, e.getCause());
        assertEquals("the reservation did shrink", MIB, r.size());
        assertEquals(MIB, m.usedBytes());
        assertEquals("the bytes stay reserved", 5 * MIB, m.reservedBytes());
        assertEquals(5 * MIB, listener.reserved.get());
        listener.unreserveFailure.set(null);
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void listenerMayCallBackIntoTheSameManager() {
        final AtomicReference<NativeMemoryManager> self = new AtomicReference<NativeMemoryManager>();
        final long capacity = 8 * MIB;
        // Like Spark: when short, the listener asks the same task's consumer to spill, which calls
        // reclaim on this very manager from inside the upcall.
        CountingListener listener = new CountingListener(capacity) {
            @Override
            void beforeReserve(long bytes) {
                NativeMemoryManager mm = self.get();
                long free = capacity - reserved.get();
                if (mm != null && free < bytes) {
                    mm.reclaim(bytes - free);
                }
                if (mm != null) {
                    // Read-outs from inside the upcall work too, and agree with this listener:
                    // what the manager counts as reserved is what this listener granted so far.
                    assertEquals(reserved.get(), mm.reservedBytes());
                    assertContains(mm.usageReport(), "Native memory of 'reentrant'");
                }
            }
        };
        NativeMemoryManager m = manager("reentrant", listener);
        self.set(m);
        NativeTesting.registerSpiller(m.handle(), "sort", 6 * MIB, 0);
        NativeReservation r = m.newReservation("java", 4 * MIB);
        assertEquals(4 * MIB, r.size());
        assertTrue("the spiller gave memory", m.stats().spilledBytes() >= 2 * MIB);
        assertEquals(listener.reserved.get(), m.reservedBytes());
        assertTrue(m.usedBytes() <= m.reservedBytes());
        r.close();
        m.close();
        assertEquals(0, listener.reserved.get());
    }
}
