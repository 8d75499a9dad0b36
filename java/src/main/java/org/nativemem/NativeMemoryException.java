package org.nativemem;

/**
 * Base class of the exceptions the native memory manager throws for failures of its own (as
 * opposed to misuse, which is reported with {@link IllegalArgumentException},
 * {@link IllegalStateException} or {@link NullPointerException}).
 *
 * <p>Thrown for: a {@link ReservationListener} that threw (the listener's exception is the
 * {@linkplain #getCause() cause}) or broke its contract, a native spiller that failed, a close
 * that timed out waiting for calls in progress, a Rust panic in the native library (message
 * {@code "native panic: ..."}; the library stays usable), and JNI failures. Out-of-memory is the
 * subclass {@link NativeOutOfMemoryException}.
 *
 * <p>Unchecked, so it passes through Spark operators and iterator code unchanged.
 */
public class NativeMemoryException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message what failed
     */
    public NativeMemoryException(String message) {
        super(message);
    }

    /**
     * @param message what failed
     * @param cause the Java exception behind it (e.g. thrown by the reservation listener)
     */
    public NativeMemoryException(String message, Throwable cause) {
        super(message, cause);
    }
}
