package org.nativemem.arrow;

import java.util.Objects;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.arrow.memory.AllocationListener;
import org.apache.arrow.memory.AllocationOutcome;
import org.apache.arrow.memory.OutOfMemoryException;
import org.nativemem.Bytes;
import org.nativemem.NativeMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeObject;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * An Arrow Java {@link AllocationListener} that charges every Arrow buffer to a pool of a
 * {@link NativeMemoryManager}, so Arrow memory shares the task's limits, spill and budget with
 * native memory. Give it to a {@code RootAllocator} (or use {@link NativeArrowAllocator}, which
 * does that and frees what is leaked); child allocators inherit it.
 *
 * <h2>Blocks: few JNI calls</h2>
 * The bytes are charged through one {@link NativeReservation} ({@code manager.newReservation(pool,
 * consumer, 0)}), in whole blocks of {@link #blockBytes()} (default 8 MiB): an allocation that
 * fits in the cushion already reserved costs no JNI call. With {@code B} the block size,
 * {@code need} the bytes Arrow holds and {@code R} the reservation's size:
 * <ul>
 *   <li><b>grow</b> when {@code need > R}: to {@code roundUp(need, B)} — one JNI call. If the
 *       pool cannot take the whole block (a limit between {@code need} and the block edge), once
 *       more by exactly {@code need - R}, so rounding never refuses what fits;
 *   <li><b>shrink</b> (hysteresis) only when the unused cushion {@code R - need} exceeds
 *       {@code 2 B}: down to {@code roundUp(need, B) + B}, leaving between one and two blocks —
 *       one JNI call. A loop that allocates and frees buffers of up to a block therefore makes at
 *       most one call, wherever it sits relative to a block edge; and while the reservation stays
 *       in whole blocks (it does unless a limit forced an exact grow) every call moves at least a
 *       block.
 * </ul>
 * With 8 MiB blocks a steady Arrow workload makes a handful of calls; the worst case (a live set
 * that only grows, then only shrinks) is two calls per 8 MiB moved, i.e. 256 per GiB against
 * 16,384 buffers of 64 KiB. {@link #jniCalls()} counts them (calls of the reservation: with a
 * reservation quantum it serves some of them from its own Java-side slack without a JNI call).
 *
 * <h2>Refusal</h2>
 * Arrow calls {@link #onPreAllocation(long)} before it accounts or allocates anything, so that is
 * where bytes are charged. If nativemem refuses them (the pool or task limit, or Spark has nothing
 * left after spilling native and JVM consumers), the listener throws Arrow's own
 * {@link OutOfMemoryException} — what {@code BufferAllocator.buffer} throws when Arrow's limit is
 * hit, and what vectors' {@code allocateNew}/{@code setSafe} callers already handle — with
 * nativemem's report as the message and the {@link NativeOutOfMemoryException} as the cause.
 * Nothing is charged then. (Arrow's other hook, {@code onFailedAllocation}, only runs after
 * Arrow's own accountant refused and its exception cannot carry a cause; this listener releases
 * its charge there and returns {@code false}, so Arrow throws its usual error.) Other nativemem
 * failures (a listener that threw, a closed manager) propagate unchanged, also before Arrow
 * charged anything.
 *
 * <h2>Exact accounting</h2>
 * The listener tracks the bytes Arrow told it about: charged at {@code onPreAllocation},
 * confirmed at {@code onAllocation}, released at {@code onFailedAllocation} and
 * {@code onRelease}. {@code onAllocation} without a preceding {@code onPreAllocation} (Arrow's
 * {@code AllocationReservation}) is charged then; since Arrow cannot refuse at that point, a
 * refusal there is logged and the bytes counted as {@linkplain #unchargedBytes() uncharged}
 * until released. Ownership transfers between allocators of one root need nothing as long as
 * they share this listener (children created with {@code newChildAllocator(name, init, max)} do).
 * The one gap: if the system allocator fails after {@code onPreAllocation} (a JVM
 * {@code OutOfMemoryError}), Arrow does not tell the listener; those bytes stay charged until
 * {@link #close()}.
 *
 * <h2>Threads and locks</h2>
 * Thread-safe: Arrow allocates and releases on any thread. The state is guarded by a private
 * lock that is never held across a JNI call: a grow may make Spark spill other consumers, which
 * may free Arrow buffers on another thread (or this one) and must not wait for this listener.
 * Concurrent growers may each add a block; the next release trims the surplus.
 *
 * <p>{@link #close()} releases the reservation (every byte back to the pool). Arrow may still
 * report releases afterwards (buffers closed late); they are ignored. Allocating after close
 * throws {@link IllegalStateException}.
 */
public final class NativeAllocationListener extends NativeObject implements AllocationListener {
    private static final Logger LOG = LoggerFactory.getLogger(NativeAllocationListener.class);

    /** Default block size: 8 MiB, like the manager's reservation block. */
    public static final long DEFAULT_BLOCK_BYTES = 8L << 20;
    /** Default pool path of Arrow memory. */
    public static final String DEFAULT_POOL = "arrow";
    /** Default consumer name in nativemem's reports. */
    public static final String DEFAULT_CONSUMER = "arrow-java";

    private final NativeReservation reservation;
    private final long blockBytes;
    private final AtomicLong jniCalls = new AtomicLong();

    private final Object lock = new Object();
    /** Bytes Arrow holds or is allocating through this listener. Guarded by lock. */
    private long live;
    /** Part of {@link #live} charged at onPreAllocation and not yet confirmed. Guarded by lock. */
    private long pending;
    /** Part of {@link #live} that could not be charged (see class doc). Guarded by lock. */
    private long uncharged;
    /**
     * The reservation's size as this listener decided it: grows are added after their JNI call
     * returns, shrinks subtracted before theirs starts, so the native size is never smaller.
     * Guarded by lock.
     */
    private long reserved;
    /** Read-outs; guarded by lock. */
    private long peakLive;
    private long allocations;
    private long allocatedTotal;
    private long releases;
    private long refusals;
    private long unmatchedReleaseBytes;

    /**
     * A listener for pool {@value #DEFAULT_POOL}, consumer {@value #DEFAULT_CONSUMER}, 8 MiB blocks.
     *
     * @param manager the manager to charge
     * @throws IllegalStateException if the manager is closed
     */
    public NativeAllocationListener(NativeMemoryManager manager) {
        this(manager, DEFAULT_POOL, DEFAULT_CONSUMER, DEFAULT_BLOCK_BYTES);
    }

    /**
     * Opens the reservation (one JNI call, 0 bytes).
     *
     * @param manager the manager to charge
     * @param poolPath the pool Arrow bytes are charged to, e.g. {@code "arrow"}; created if missing
     * @param consumer the consumer name in nativemem's reports and errors
     * @param blockBytes bytes per grow, {@code > 0}
     * @throws IllegalArgumentException if {@code blockBytes <= 0} or the pool path is malformed
     * @throws IllegalStateException if the manager is closed
     */
    public NativeAllocationListener(NativeMemoryManager manager, String poolPath, String consumer, long blockBytes) {
        // No handle of its own: the native object is the reservation, closed by closeNative().
        super(manager, 0);
        Objects.requireNonNull(poolPath, "poolPath");
        Objects.requireNonNull(consumer, "consumer");
        if (blockBytes <= 0) {
            throw new IllegalArgumentException("nativemem: Arrow block size must be > 0, got " + blockBytes);
        }
        this.blockBytes = blockBytes;
        jniCalls.incrementAndGet();
        this.reservation = manager.newReservation(poolPath, consumer, 0);
    }

    // ---- AllocationListener --------------------------------------------------------------------

    /**
     * Charges {@code size} bytes before Arrow allocates them.
     *
     * @throws OutOfMemoryException if nativemem refused them (message: nativemem's report; cause:
     *     the {@link NativeOutOfMemoryException}); nothing is charged
     * @throws IllegalStateException if this listener or its manager is closed
     */
    @Override
    public void onPreAllocation(long size) {
        if (size <= 0) {
            return;
        }
        try {
            charge(size, true);
        } catch (NativeOutOfMemoryException e) {
            synchronized (lock) {
                refusals++;
            }
            throw new OutOfMemoryException("nativemem: Arrow allocation of " + size + " bytes (" + Bytes.human(size)
                    + ") refused in pool '" + reservation.poolPath() + "' of '" + manager().name() + "': "
                    + e.getMessage(), e);
        }
    }

    @Override
    public void onAllocation(long size) {
        if (size <= 0) {
            return;
        }
        synchronized (lock) {
            if (pending >= size) {
                pending -= size; // charged at onPreAllocation
                return;
            }
        }
        // Not announced by onPreAllocation (AllocationReservation): Arrow allocated already and
        // cannot take a refusal here, so a refused charge is only counted.
        try {
            charge(size, false);
        } catch (NativeMemoryException | IllegalStateException e) {
            synchronized (lock) {
                live += size;
                uncharged += size;
                peakLive = Math.max(peakLive, live);
                allocations++;
                allocatedTotal += size;
            }
            LOG.warn("nativemem: {} bytes Arrow allocated without onPreAllocation could not be charged to pool '{}'"
                    + " of '{}'; counted as uncharged until released", size, reservation.poolPath(), manager().name(),
                    e);
        }
    }

    /** Releases the charge of an allocation Arrow's own accountant refused; Arrow then throws. */
    @Override
    public boolean onFailedAllocation(long size, AllocationOutcome outcome) {
        if (size > 0) {
            synchronized (lock) {
                pending -= Math.min(size, pending);
            }
            release(size, false);
        }
        return false;
    }

    @Override
    public void onRelease(long size) {
        if (size > 0) {
            release(size, true);
        }
    }

    // ---- accounting ----------------------------------------------------------------------------

    /** Charges {@code size} (announced: at onPreAllocation). On any exception nothing changed. */
    private void charge(long size, boolean announced) {
        long growBy;
        long exact;
        synchronized (lock) {
            checkNotClosed();
            if (take(size, announced)) {
                return;
            }
            exact = need() + size - reserved;
            growBy = roundUp(need() + size) - reserved;
        }
        while (true) {
            long grown = grow(growBy, exact);
            synchronized (lock) {
                reserved += grown;
                checkNotClosed();
                if (take(size, announced)) {
                    return;
                }
                // Other threads took the cushion meanwhile: grow again.
                exact = need() + size - reserved;
                growBy = roundUp(need() + size) - reserved;
            }
        }
    }

    /** Under lock: takes {@code size} from the cushion if it fits. */
    private boolean take(long size, boolean announced) {
        if (need() + size > reserved) {
            return false;
        }
        live += size;
        if (announced) {
            pending += size;
        }
        peakLive = Math.max(peakLive, live);
        allocations++;
        allocatedTotal += size;
        return true;
    }

    /**
     * Grows the reservation by {@code growBy}, or by {@code exact} if the pool refuses the whole
     * block. No lock held.
     *
     * @return bytes grown
     */
    private long grow(long growBy, long exact) {
        try {
            jniCalls.incrementAndGet();
            reservation.grow(growBy);
            return growBy;
        } catch (NativeOutOfMemoryException blockRefused) {
            if (exact <= 0 || exact >= growBy) {
                throw blockRefused;
            }
            jniCalls.incrementAndGet();
            reservation.grow(exact);
            return exact;
        }
    }

    private void release(long size, boolean counted) {
        long shrinkBy = 0;
        synchronized (lock) {
            if (counted) {
                releases++;
            }
            if (size > live) {
                unmatchedReleaseBytes += size - live;
                size = live;
            }
            live -= size;
            uncharged = Math.min(uncharged, live);
            pending = Math.min(pending, live);
            if (closeCalled()) {
                return;
            }
            long need = need();
            if (reserved - need > 2 * blockBytes) {
                long target = roundUp(need) + blockBytes;
                shrinkBy = reserved - target;
                reserved = target;
            }
        }
        if (shrinkBy > 0) {
            try {
                jniCalls.incrementAndGet();
                reservation.shrink(shrinkBy);
            } catch (IllegalStateException closedMeanwhile) {
                // The listener or the manager was closed concurrently: it released everything.
            } catch (NativeMemoryException e) {
                // The reservation did shrink; the listener (Spark) failed to take bytes back and
                // the manager offers them again later.
                LOG.warn("nativemem: returning {} of Arrow cushion in pool '{}' of '{}' failed", Bytes.human(shrinkBy),
                        reservation.poolPath(), manager().name(), e);
            }
        }
    }

    /** Under lock: bytes that must be covered by the reservation. */
    private long need() {
        return live - uncharged;
    }

    private long roundUp(long bytes) {
        long blocks = (bytes + blockBytes - 1) / blockBytes;
        return blocks * blockBytes;
    }

    @Override
    protected String describe() {
        return "nativemem: the Arrow allocation listener of pool '" + reservation.poolPath() + "' of '"
                + manager().name() + "'";
    }

    // ---- read-outs -----------------------------------------------------------------------------

    /** @return bytes Arrow holds through this listener now (what it was told, net) */
    public long allocatedBytes() {
        synchronized (lock) {
            return live;
        }
    }

    /** @return the highest {@link #allocatedBytes()} so far */
    public long peakAllocatedBytes() {
        synchronized (lock) {
            return peakLive;
        }
    }

    /**
     * @return bytes charged to the pool now: whole blocks covering {@link #allocatedBytes()}
     *     plus the cushion (0 after close). Between calls on other threads, exactly the size of
     *     the native reservation.
     */
    public long reservedBytes() {
        synchronized (lock) {
            return closeCalled() ? 0 : reserved;
        }
    }

    /** @return bytes reserved and not used by Arrow: {@code reservedBytes() - allocatedBytes()} */
    public long cushionBytes() {
        synchronized (lock) {
            return closeCalled() ? 0 : reserved - need();
        }
    }

    /** @return the block size in bytes */
    public long blockBytes() {
        return blockBytes;
    }

    /** @return JNI calls made so far: opening the reservation, grows, shrinks and the close */
    public long jniCalls() {
        return jniCalls.get();
    }

    /** @return allocations charged so far (Arrow buffers, one each) */
    public long allocations() {
        synchronized (lock) {
            return allocations;
        }
    }

    /** @return bytes of all allocations charged so far (cumulative) */
    public long allocatedTotalBytes() {
        synchronized (lock) {
            return allocatedTotal;
        }
    }

    /** @return releases Arrow reported so far */
    public long releases() {
        synchronized (lock) {
            return releases;
        }
    }

    /** @return allocations nativemem refused (each an Arrow {@link OutOfMemoryException}) */
    public long refusals() {
        synchronized (lock) {
            return refusals;
        }
    }

    /** @return bytes Arrow holds that could not be charged (see class doc; normally 0) */
    public long unchargedBytes() {
        synchronized (lock) {
            return uncharged;
        }
    }

    /** @return bytes Arrow reported released beyond what it had reported allocated (normally 0) */
    public long unmatchedReleaseBytes() {
        synchronized (lock) {
            return unmatchedReleaseBytes;
        }
    }

    /** @return the pool path bytes are charged to */
    public String poolPath() {
        return reservation.poolPath();
    }

    /** The reservation (package-private: for tests, which compare its native size). */
    NativeReservation reservation() {
        return reservation;
    }

    /**
     * Releases the reservation: every byte charged goes back to the pool, whatever Arrow still
     * holds ({@link NativeObject#close()}: idempotent and thread-safe; the reservation's close is a
     * no-op once the manager is closed, which released it).
     */
    @Override
    protected void closeNative() {
        if (!manager().isClosed()) {
            jniCalls.incrementAndGet();
        }
        reservation.close();
    }

    /** The reservation's own close knows the manager's state: always delegate to it. */
    @Override
    protected boolean closedWithManager() {
        return false;
    }

    @Override
    public String toString() {
        synchronized (lock) {
            return "NativeAllocationListener{pool='" + reservation.poolPath() + "', manager='" + manager().name()
                    + "', allocated=" + live + ", reserved=" + (closeCalled() ? 0 : reserved) + ", block=" + blockBytes
                    + ", allocations=" + allocations + ", jniCalls=" + jniCalls.get() + (closeCalled() ? ", closed" : "")
                    + "}";
        }
    }
}
