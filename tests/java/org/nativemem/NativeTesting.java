package org.nativemem;

/**
 * Test-only native entry points of libnativemem_jni (native/jni/src/testing.rs). This class is
 * not in the published jar, so production code cannot reach them.
 */
final class NativeTesting {
    static {
        NativeLibraryLoader.load();
    }

    private NativeTesting() {
    }

    /** Panics inside an export with {@code message}. */
    static native void panic(String message);

    /** Panics while a call on the manager is in flight. */
    static native void panicInCall(long manager);

    /**
     * Registers a native spiller holding {@code bytes} in {@code pool}; a spill frees up to the
     * target after sleeping {@code delayMillis}. Kept until the manager closes.
     */
    static native void registerSpiller(long manager, String pool, long bytes, long delayMillis);

    /** Calls in flight on the manager now. */
    static native long inFlight(long manager);

    /** A native allocation of {@code bytes} charged to {@code pool}; returns its address. */
    static native long allocate(long manager, String pool, long bytes);

    /** Frees an allocation made by {@link #allocate}; returns its size. */
    static native long free(long manager, long address);

    /**
     * Starts {@code threads} native threads that each grow a reservation {@code iterations} times
     * by {@code bytesPerGrow}, then free it. Returns how many were still attached to the JVM after
     * their upcalls; rethrows the first error.
     */
    static native int growFromNativeThreads(long manager, String pool, int threads, int iterations, long bytesPerGrow);
}
