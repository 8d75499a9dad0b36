package org.nativemem;

/**
 * The benchmark-only exports of libnativemem_jni (native/jni/src/bench.rs), used by
 * {@code org.nativemem.bench.JniBench} ({@code scripts/bench.sh}). The class name must be
 * {@code org.nativemem.NativeBench} because JNI binds the exports by class name. It lives in
 * nativemem-e2e.jar only: the published nativemem.jar has no way to reach these exports.
 *
 * <p>The grow loops run in native code, where native operators grow memory; what they compare is
 * how often a grow crosses into the JVM.
 */
public final class NativeBench {
    static {
        NativeLibraryLoader.load();
    }

    private NativeBench() {
    }

    /** Returns {@code value}: one JNI downcall through the export guard, nothing else (a baseline). */
    public static native long noop(long value);

    /**
     * Grows one native reservation of the pool at {@code poolPath} by {@code bytesPerGrow}
     * {@code count} times, then frees it. The manager reserves from its listener a block at a time.
     *
     * @return the bytes held before the free ({@code count * bytesPerGrow})
     * @throws IllegalStateException if the manager is closed
     * @throws NativeOutOfMemoryException if a grow is refused (nothing stays held)
     */
    public static native long growLoop(long manager, String poolPath, long bytesPerGrow, int count);

    /**
     * The per-grow design: calls {@code listener.reserve(bytesPerGrow)} from native code
     * {@code count} times (one JVM upcall per grow), then {@code listener.unreserve} of the total.
     *
     * @return the bytes granted in all ({@code count * bytesPerGrow})
     * @throws NativeMemoryException if a grant is short (what was granted is given back)
     */
    public static native long upcallPerGrowLoop(ReservationListener listener, long bytesPerGrow, int count);
}
