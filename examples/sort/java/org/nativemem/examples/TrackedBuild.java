package org.nativemem.examples;

import org.nativemem.NativeMemoryManager;

/**
 * An engine's allocations that ask nobody, charged anyway: {@code libnativemem_examples} is built
 * with nativemem-track's {@code TrackingAllocator} as its global allocator, and
 * {@link #build(NativeMemoryManager, long)} builds a Rust {@code HashMap} and {@code Vec} on a
 * thread bound to a tracker of the task's pool {@code engine/tracked}, with no reservation call.
 * The pool follows what the thread holds within the tracker's flush threshold (1 MiB), is exact
 * once the binding ends, and is credited when the memory is freed after the scope.
 */
public final class TrackedBuild {
    /** Values of {@link #build}, in order. */
    public static final int USED_WHILE_HELD = 0;
    public static final int HELD_BYTES = 1;
    public static final int USED_AFTER_SCOPE = 2;
    public static final int USED_AFTER_FREE = 3;
    public static final int FLUSHES = 4;
    public static final int OVERCOMMITTED = 5;
    public static final int ALLOCATOR_INSTALLED = 6;
    public static final int USED_BEFORE = 7;

    private TrackedBuild() {
    }

    /**
     * Builds and frees a hash map and a vector of {@code entries} 64-bit entries on a tracked
     * native thread.
     *
     * @return {pool used while held, bytes the map and vector held (headers included), pool used
     *     once the binding ended, pool used after the free, flushes, over-committed bytes, 1 if the
     *     tracking allocator is installed, pool used before}
     */
    public static long[] build(NativeMemoryManager manager, long entries) {
        ExamplesLibraryLoader.load();
        return nativeTrackedBuild(NativeMemoryManager.nativeApi(), manager.handle(), entries);
    }

    private static native long[] nativeTrackedBuild(long api, long manager, long entries);
}
