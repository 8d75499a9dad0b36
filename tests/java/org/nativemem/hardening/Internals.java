package org.nativemem.hardening;

import java.lang.reflect.Constructor;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;

import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeReservation;
import org.nativemem.ReservationListener;

/**
 * The package-private pieces of {@code org.nativemem} these tests need, reached by reflection from
 * this package: the test-only natives of {@code org.nativemem.NativeTesting}
 * (native/jni/src/testing.rs), the natives behind the API (to pass stale handles), and the
 * manager's constructor (to wrap a manager the test natives created). An exception a native
 * throws reaches the caller unchanged (not wrapped in {@link InvocationTargetException}).
 */
final class Internals {
    private static final Class<?> TESTING = type("org.nativemem.NativeTesting");

    private Internals() {
    }

    // ---- org.nativemem.NativeTesting ---------------------------------------------------------

    static void registerSpiller(long manager, String pool, long bytes, long delayMillis) {
        invoke(TESTING, "registerSpiller", sig(long.class, String.class, long.class, long.class), manager, pool,
                bytes, delayMillis);
    }

    static void registerPanickingSpiller(long manager, String pool, long bytes, int panics, String message) {
        invoke(TESTING, "registerPanickingSpiller", sig(long.class, String.class, long.class, int.class, String.class),
                manager, pool, bytes, panics, message);
    }

    static void registerAndDropSpiller(long manager, String pool, long bytes) {
        invoke(TESTING, "registerAndDropSpiller", sig(long.class, String.class, long.class), manager, pool, bytes);
    }

    static long createPanickyManager(String name, ReservationListener listener, long blockBytes,
            int panicAtReserveCall, int panicAtUnreserveCall, String message) {
        return (Long) invoke(TESTING, "createPanickyManager", sig(String.class, ReservationListener.class, long.class,
                int.class, int.class, String.class), name, listener, blockBytes, panicAtReserveCall,
                panicAtUnreserveCall, message);
    }

    static long allocate(long manager, String pool, long bytes) {
        return (Long) invoke(TESTING, "allocate", sig(long.class, String.class, long.class), manager, pool, bytes);
    }

    static long free(long manager, long address) {
        return (Long) invoke(TESTING, "free", sig(long.class, long.class), manager, address);
    }

    static int growFromNativeThreads(long manager, String pool, int threads, int iterations, long bytesPerGrow) {
        return (Integer) invoke(TESTING, "growFromNativeThreads", sig(long.class, String.class, int.class, int.class,
                long.class), manager, pool, threads, iterations, bytesPerGrow);
    }

    static long startNativeChurn(long manager, String pool, int threads, long durationMillis,
            long maxBytesPerThread, boolean spillable, long seed) {
        return (Long) invoke(TESTING, "startNativeChurn", sig(long.class, String.class, int.class, long.class,
                long.class, boolean.class, long.class), manager, pool, threads, durationMillis, maxBytesPerThread,
                spillable, seed);
    }

    static long churnOps(long churn) {
        return (Long) invoke(TESTING, "churnOps", sig(long.class), churn);
    }

    static int churnRunning(long churn) {
        return (Integer) invoke(TESTING, "churnRunning", sig(long.class), churn);
    }

    static long[] joinNativeChurn(long churn, long timeoutMillis) {
        return (long[]) invoke(TESTING, "joinNativeChurn", sig(long.class, long.class), churn, timeoutMillis);
    }

    // ---- org.nativemem internals -------------------------------------------------------------

    /** Live native handles in this process: {managers, reservations}. */
    static long[] liveHandles() {
        return (long[]) invoke(NativeMemoryManager.class, "nativeLiveHandles", sig());
    }

    /** The native handle of a reservation (also after close). */
    static long handleOf(NativeReservation reservation) {
        return (Long) invoke(NativeReservation.class, reservation, "nativeHandle", sig());
    }

    /** {@code NativeReservation.nativeGrow(handle, bytes)}: the native call without the Java-side checks. */
    static void nativeGrow(long reservation, long bytes) {
        invoke(NativeReservation.class, "nativeGrow", sig(long.class, long.class), reservation, bytes);
    }

    /** A {@link NativeMemoryManager} over a handle the test natives created. */
    static NativeMemoryManager wrap(long handle, String name, NativeMemoryConfig config) {
        try {
            Constructor<NativeMemoryManager> c = NativeMemoryManager.class.getDeclaredConstructor(long.class,
                    String.class, NativeMemoryConfig.class);
            c.setAccessible(true);
            return c.newInstance(handle, name, config);
        } catch (InvocationTargetException e) {
            throw rethrow(e.getCause());
        } catch (ReflectiveOperationException e) {
            throw new AssertionError("cannot construct NativeMemoryManager", e);
        }
    }

    // ---- reflection ----------------------------------------------------------------------------

    private static Class<?> type(String name) {
        try {
            return Class.forName(name);
        } catch (ClassNotFoundException e) {
            throw new AssertionError(name + " is not on the test classpath", e);
        }
    }

    private static Class<?>[] sig(Class<?>... types) {
        return types;
    }

    private static Object invoke(Class<?> owner, String name, Class<?>[] types, Object... args) {
        return invoke(owner, null, name, types, args);
    }

    private static Object invoke(Class<?> owner, Object target, String name, Class<?>[] types, Object... args) {
        Method m;
        try {
            m = owner.getDeclaredMethod(name, types);
        } catch (NoSuchMethodException e) {
            throw new AssertionError(owner.getName() + "." + name + " is not declared", e);
        }
        m.setAccessible(true);
        try {
            return m.invoke(target, args);
        } catch (InvocationTargetException e) {
            throw rethrow(e.getCause());
        } catch (IllegalAccessException e) {
            throw new AssertionError("cannot call " + owner.getName() + "." + name, e);
        }
    }

    /** Throws {@code t} as it is (checked or not); declared to return so callers can {@code throw} it. */
    private static RuntimeException rethrow(Throwable t) {
        Internals.<RuntimeException>sneakyThrow(t);
        return new IllegalStateException("unreachable");
    }

    @SuppressWarnings("unchecked")
    private static <T extends Throwable> void sneakyThrow(Throwable t) throws T {
        throw (T) t;
    }
}
