package org.nativemem.arrow;

import java.lang.invoke.MethodHandle;
import java.lang.invoke.MethodHandles;
import java.lang.invoke.MethodType;
import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.arrow.memory.AllocationManager;
import org.apache.arrow.memory.ArrowBuf;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.memory.ReferenceManager;

/**
 * The memory behind a {@link NativeArrowAllocator}'s buffers: each Arrow allocation is one
 * system allocation ({@code sun.misc.Unsafe.allocateMemory}, as Arrow's own
 * {@code arrow-memory-unsafe} does), and this factory knows every one that is still live, so
 * that {@link #freeLive()} can free what a task leaked once its allocator is closed — the way the
 * native manager frees leaked native memory at close.
 *
 * <p>Arrow frees a buffer's memory through {@code AllocationManager.release0()} when its last
 * reference is released; {@link #freeLive()} frees the rest. Each allocation is freed exactly
 * once, whichever comes first: a buffer released after {@link #freeLive()} frees nothing.
 *
 * <p>If {@code sun.misc.Unsafe} cannot be reached ({@link #AVAILABLE} is false, with
 * {@link #UNAVAILABLE_REASON}), {@link NativeArrowAllocator} uses Arrow's default allocation
 * manager instead and can only report leaks, not free them.
 */
final class TrackingAllocationManagerFactory implements AllocationManager.Factory {
    /** {@code long allocateMemory(long)} of the Unsafe instance, or null. */
    private static final MethodHandle ALLOCATE;
    /** {@code void freeMemory(long)} of the Unsafe instance, or null. */
    private static final MethodHandle FREE;
    /** Whether this factory can be used. */
    static final boolean AVAILABLE;
    /** Why it cannot, or null. */
    static final String UNAVAILABLE_REASON;
    /** The zero-length buffer: a fixed address (never freed), no reference counting. */
    private static final ArrowBuf EMPTY;

    static {
        MethodHandle allocate = null;
        MethodHandle free = null;
        String reason = null;
        try {
            Class<?> unsafeClass = Class.forName("sun.misc.Unsafe");
            Field f = unsafeClass.getDeclaredField("theUnsafe");
            f.setAccessible(true);
            Object unsafe = f.get(null);
            MethodHandles.Lookup lookup = MethodHandles.lookup();
            allocate = lookup.findVirtual(unsafeClass, "allocateMemory", MethodType.methodType(long.class, long.class))
                    .bindTo(unsafe);
            free = lookup.findVirtual(unsafeClass, "freeMemory", MethodType.methodType(void.class, long.class))
                    .bindTo(unsafe);
        } catch (ReflectiveOperationException | RuntimeException | LinkageError e) {
            reason = e.toString();
            allocate = null;
            free = null;
        }
        ALLOCATE = allocate;
        FREE = free;
        AVAILABLE = allocate != null;
        UNAVAILABLE_REASON = reason;
        EMPTY = AVAILABLE ? new ArrowBuf(ReferenceManager.NO_OP, null, 0, allocate(8)) : null;
    }

    /** Allocations not freed yet. */
    private final Set<TrackedAllocation> live = ConcurrentHashMap.newKeySet();

    @Override
    public AllocationManager create(BufferAllocator accountingAllocator, long size) {
        return new TrackedAllocation(accountingAllocator, size);
    }

    @Override
    public ArrowBuf empty() {
        return EMPTY;
    }

    /** @return allocations not freed yet */
    int liveCount() {
        return live.size();
    }

    /** @return bytes of the allocations not freed yet */
    long liveBytes() {
        long bytes = 0;
        for (TrackedAllocation a : live) {
            bytes += a.size;
        }
        return bytes;
    }

    /**
     * Frees every allocation still live. Their buffers must not be used afterwards.
     *
     * @return {count, bytes} freed by this call
     */
    long[] freeLive() {
        List<TrackedAllocation> snapshot = new ArrayList<>(live);
        long count = 0;
        long bytes = 0;
        for (TrackedAllocation a : snapshot) {
            if (a.free()) {
                count++;
                bytes += a.size;
            }
        }
        return new long[] {count, bytes};
    }

    private static long allocate(long size) {
        try {
            return (long) ALLOCATE.invokeExact(size);
        } catch (RuntimeException | Error e) {
            throw e;
        } catch (Throwable t) {
            throw new IllegalStateException("nativemem: Unsafe.allocateMemory(" + size + ") failed", t);
        }
    }

    private static void free(long address) {
        try {
            FREE.invokeExact(address);
        } catch (RuntimeException | Error e) {
            throw e;
        } catch (Throwable t) {
            throw new IllegalStateException("nativemem: Unsafe.freeMemory failed", t);
        }
    }

    /** One Arrow allocation: its own block of system memory. */
    private final class TrackedAllocation extends AllocationManager {
        final long size;
        final long address;
        private final AtomicBoolean freed = new AtomicBoolean();

        TrackedAllocation(BufferAllocator accountingAllocator, long size) {
            super(accountingAllocator);
            this.size = size;
            this.address = allocate(size);
            live.add(this);
        }

        @Override
        public long getSize() {
            return size;
        }

        @Override
        protected long memoryAddress() {
            return address;
        }

        @Override
        protected void release0() {
            free();
        }

        /** @return true if this call freed the memory */
        boolean free() {
            if (!freed.compareAndSet(false, true)) {
                return false;
            }
            live.remove(this);
            TrackingAllocationManagerFactory.free(address);
            return true;
        }
    }
}
