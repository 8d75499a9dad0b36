package org.nativemem;

/**
 * A memory request could not be satisfied: a pool limit (or the task limit) would have been
 * exceeded, or the {@link ReservationListener} granted too little even after native consumers
 * were spilled.
 *
 * <p>The message is the full diagnosis: the first line says what was asked, for which consumer,
 * in which pool and why it was refused; the rest is the manager's usage report (the pool tree
 * with used / peak / limit and the largest consumers, in human units), the same text as
 * {@link NativeMemoryManager#usageReport()} at the moment of the refusal.
 *
 * <p>When it is thrown nothing changed: the request was rolled back entirely.
 */
public class NativeOutOfMemoryException extends NativeMemoryException {
    private static final long serialVersionUID = 1L;

    /**
     * @param message the refusal and the usage report
     */
    public NativeOutOfMemoryException(String message) {
        super(message);
    }
}
