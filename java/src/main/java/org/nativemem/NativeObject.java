package org.nativemem;

import java.util.Objects;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * Base of a Java object standing for a native one that belongs to a {@link NativeMemoryManager}:
 * a {@link NativeReservation}, an engine's operator (an example engine's sorter or DataFusion
 * task), the Arrow listener. It holds the manager, the native handle and the closed state, and
 * gets the close race right once:
 *
 * <ul>
 *   <li>{@link #close()} is idempotent and thread-safe (compare-and-set): the first call runs
 *       {@link #closeNative()}, later ones return at once.</li>
 *   <li>The manager's close disposes of what it owns. If {@link #closedWithManager()} (the
 *       default), {@code close()} after the manager's close does nothing; either way, a native
 *       close that finds the handle gone ({@link IllegalStateException}) because the manager
 *       closed meanwhile is not an error.</li>
 *   <li>{@link #isClosed()} is true once {@code close()} was called or the manager is closed;
 *       {@link #checkOpen()} guards each native call with one message naming the object
 *       ({@link #describe()}).</li>
 * </ul>
 *
 * Native methods of a subclass take {@link #handle()} first. The handle is never a pointer: a
 * stale or forged one is an {@link IllegalStateException} from the native side, never a crash.
 */
public abstract class NativeObject implements AutoCloseable {
    private final NativeMemoryManager manager;
    private final long handle;
    private final AtomicBoolean closed = new AtomicBoolean();

    /**
     * @param manager the manager the native object belongs to
     * @param handle the native object's handle ({@code 0} for an object without one of its own,
     *     e.g. one that closes other {@code NativeObject}s)
     * @throws NullPointerException if {@code manager} is null
     */
    protected NativeObject(NativeMemoryManager manager, long handle) {
        this.manager = Objects.requireNonNull(manager, "manager");
        this.handle = handle;
    }

    /** @return the manager this object belongs to */
    public NativeMemoryManager manager() {
        return manager;
    }

    /** @return the native handle, the first argument of this object's native methods */
    protected final long handle() {
        return handle;
    }

    /** @return the handle as the native library prints it: {@code 0x} and 16 hex digits */
    protected final String hexHandle() {
        return NativeMemoryManager.hex(handle);
    }

    /** @return true once {@link #close()} was called or the manager is closed */
    public boolean isClosed() {
        return closed.get() || manager.isClosed();
    }

    /** @return true once {@link #close()} was called (whatever the manager's state) */
    protected final boolean closeCalled() {
        return closed.get();
    }

    /**
     * Releases the native object. Idempotent and thread-safe: the first call runs
     * {@link #closeNative()}, later ones return at once; see the class doc for the manager's close.
     *
     * @throws IllegalStateException if the native close found the handle stale while the manager
     *     is open (a bug: nothing else closes it)
     */
    @Override
    public final void close() {
        if (!closed.compareAndSet(false, true) || (closedWithManager() && manager.isClosed())) {
            return;
        }
        try {
            closeNative();
        } catch (IllegalStateException e) {
            // The manager was closed after the check above and disposed of the object itself.
            if (!manager.isClosed()) {
                throw e;
            }
        }
    }

    /** Releases the native object; called once, by the first {@link #close()}. */
    protected abstract void closeNative();

    /**
     * @return true if the manager's close disposes of the native object, so that {@link #close()}
     *     after it has nothing to do (the default); false if {@link #closeNative()} must run anyway
     */
    protected boolean closedWithManager() {
        return true;
    }

    /** @return the object in messages, e.g. {@code NativeSorter 'run-3'} ("... is closed") */
    protected abstract String describe();

    /**
     * Guards a native call.
     *
     * @throws IllegalStateException if this object or its manager is closed
     */
    protected final void checkOpen() {
        checkNotClosed();
        if (manager.isClosed()) {
            throw managerClosed();
        }
    }

    /**
     * Guards a call that needs only this object open (it may still work from state of its own
     * after the manager's close).
     *
     * @throws IllegalStateException if {@link #close()} was called
     */
    protected final void checkNotClosed() {
        if (closed.get()) {
            throw new IllegalStateException(describe() + " is closed");
        }
    }

    /** @return the exception of {@link #checkOpen()} when the manager is closed */
    protected IllegalStateException managerClosed() {
        return new IllegalStateException(describe() + " is closed: its NativeMemoryManager '" + manager.name()
                + "' was closed");
    }
}
