package org.nativemem.spark;

/**
 * Something a task attempt owns beside its native memory manager that must be closed before the
 * manager (today: the task's Arrow allocator, {@link TaskArrowAllocator}). Registered through
 * {@link TaskNativeMemory#resource}; the completion listener of {@link TaskNativeMemory} closes
 * every resource of the task, newest first, and only then the manager — whatever order Spark
 * runs completion listeners in (it runs them in reverse registration order, and a resource is
 * usually created after the manager).
 *
 * <p>Implementations must not reference optional libraries in this interface's signatures:
 * {@link TaskNativeMemory} loads it whether or not Arrow is on the classpath.
 */
interface TaskResource {
    /**
     * @return bytes of Arrow buffers allocated through this resource now, for the executor's
     *     gauges; -1 if it is not an Arrow allocator. Called from the metrics thread.
     */
    long arrowAllocatedBytes();

    /**
     * Closes the resource at the end of its task (success, failure or kill), on the task's
     * thread. Must not throw because the task left something open: free it and describe it.
     *
     * @return what the task left open and this close freed, or null if nothing
     */
    Leak closeAtTaskEnd();

    /** What a task left open in a resource. */
    final class Leak {
        /** Bytes the close freed (or, if it could not free them, found). */
        final long bytes;
        /** Readable description, including the library's own leak text. */
        final String text;

        Leak(long bytes, String text) {
            this.bytes = bytes;
            this.text = text;
        }
    }
}
