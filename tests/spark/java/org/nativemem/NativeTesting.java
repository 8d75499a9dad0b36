package org.nativemem;

/**
 * The e2e jobs' binding of the test-only exports of libnativemem_jni (native/jni/src/testing.rs):
 * a native spiller and native allocations, which Java alone cannot create. It is a copy of the
 * declarations the JUnit tests use (tests/java/org/nativemem/NativeTesting.java); the class name
 * must be {@code org.nativemem.NativeTesting} because JNI binds the exports by class name. It
 * lives in nativemem-e2e.jar only: the published nativemem.jar has no way to reach these exports.
 *
 * <p>Every method takes the manager's {@link NativeMemoryManager#handle()} and, like any export,
 * throws {@link IllegalStateException} for a closed manager.
 */
public final class NativeTesting {
    static {
        NativeLibraryLoader.load();
    }

    private NativeTesting() {
    }

    /**
     * Registers a native spiller holding {@code bytes} in {@code pool} (reserved now, through the
     * listener); a spill frees up to its target after sleeping {@code delayMillis}. Kept until
     * the manager closes.
     */
    public static native void registerSpiller(long manager, String pool, long bytes, long delayMillis);

    /** A native allocation of {@code bytes} charged to {@code pool}; returns its address. */
    public static native long allocate(long manager, String pool, long bytes);

    /** Frees an allocation made by {@link #allocate}; returns its size. */
    public static native long free(long manager, long address);

    /**
     * Starts {@code threads} native threads that each grow a reservation {@code iterations} times
     * by {@code bytesPerGrow} (upcalls to the listener from threads the JVM did not start), then
     * free it. Returns how many were still attached after their upcalls; rethrows the first error.
     */
    public static native int growFromNativeThreads(long manager, String pool, int threads, int iterations,
            long bytesPerGrow);
}
