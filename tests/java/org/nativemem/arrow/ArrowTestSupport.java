package org.nativemem.arrow;

import static org.junit.Assert.assertEquals;

import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicLong;

import org.junit.After;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.ReservationListener;

/**
 * Base of the Arrow tests: managers on a {@link Budget} listener, closed after each test, and the
 * checks every step repeats.
 */
abstract class ArrowTestSupport {
    static final long KIB = 1L << 10;
    static final long MIB = 1L << 20;
    static final long GIB = 1L << 30;

    private final List<AutoCloseable> toClose = new ArrayList<>();

    /** A ReservationListener with a capacity (Spark's budget) that counts what it holds. */
    static final class Budget implements ReservationListener {
        final long capacity;
        final AtomicLong held = new AtomicLong();
        final AtomicLong calls = new AtomicLong();

        Budget(long capacity) {
            this.capacity = capacity;
        }

        @Override
        public long reserve(long bytes) {
            calls.incrementAndGet();
            while (true) {
                long cur = held.get();
                long grant = Math.max(0, Math.min(bytes, capacity - cur));
                if (held.compareAndSet(cur, cur + grant)) {
                    return grant;
                }
            }
        }

        @Override
        public void unreserve(long bytes) {
            calls.incrementAndGet();
            if (held.addAndGet(-bytes) < 0) {
                throw new AssertionError("unreserve(" + bytes + ") below 0");
            }
        }
    }

    @After
    public void closeAll() throws Exception {
        for (int i = toClose.size() - 1; i >= 0; i--) {
            toClose.get(i).close();
        }
    }

    <T extends AutoCloseable> T track(T c) {
        toClose.add(c);
        return c;
    }

    NativeMemoryManager manager(String name, Budget budget, NativeMemoryConfig config) {
        return track(NativeMemoryManager.create(name, budget, config));
    }

    /**
     * A manager with 1 MiB reservation blocks, an unbounded budget and exact accounting
     * (reservation quantum 0, opt-in: the default is the 1 MiB quantum): the tests pin the
     * manager's used to Arrow's bytes to the byte.
     */
    NativeMemoryManager manager(String name) {
        return manager(name, new Budget(Long.MAX_VALUE), exact().withReservationBlockSize(MIB));
    }

    /** The defaults with exact accounting (quantum 0, opt-in). */
    static NativeMemoryConfig exact() {
        return NativeMemoryConfig.defaults().withReservationQuantum(0);
    }

    static long roundUp(long bytes, long block) {
        return (bytes + block - 1) / block * block;
    }

    /**
     * The invariants after every step on one thread: the listener saw what Arrow counts, the
     * native reservation is exactly the listener's reserved bytes, which cover what is allocated,
     * and {@code managerOthers} (other pools' bytes) plus them is the manager's used.
     */
    static void assertAccounting(String step, NativeArrowAllocator a, NativeMemoryManager mm, long managerOthers) {
        NativeAllocationListener l = a.listener();
        assertEquals(step + ": listener == Arrow's allocated", a.allocator().getAllocatedMemory(), l.allocatedBytes());
        assertEquals(step + ": native reservation == listener's reserved", l.reservedBytes(), l.reservation().size());
        assertEquals(step + ": manager used == arrow pool + others", managerOthers + l.reservedBytes(), mm.usedBytes());
        long need = l.allocatedBytes() - l.unchargedBytes();
        if (l.reservedBytes() < need) {
            throw new AssertionError(step + ": reserved " + l.reservedBytes() + " < need " + need);
        }
        if (l.reservedBytes() - need > 2 * l.blockBytes()) {
            throw new AssertionError(step + ": cushion " + (l.reservedBytes() - need) + " above two blocks");
        }
    }
}
