package org.nativemem.spark;

import org.apache.arrow.memory.BufferAllocator;
import org.apache.spark.TaskContext;
import org.nativemem.Bytes;
import org.nativemem.NativeMemoryManager;
import org.nativemem.arrow.ArrowCloseReport;
import org.nativemem.arrow.NativeAllocationListener;
import org.nativemem.arrow.NativeArrowAllocator;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Arrow Java allocator of the current Spark task attempt: its buffers are charged to the
 * task's native memory manager ({@link TaskNativeMemory#get()}) in pool {@value #POOL}, so Arrow
 * memory shares the task's budget, limits and spill with native memory.
 *
 * <pre>{@code
 * BufferAllocator allocator = TaskArrowAllocator.get();   // this task attempt's, created on first use
 * try (BigIntVector v = new BigIntVector("ids", allocator)) {
 *     for (int i = 0; i < n; i++) v.setSafe(i, i);       // charged in 8 MiB blocks, not per buffer
 *     v.setValueCount(n);
 *     ...
 * }
 * }</pre>
 *
 * <h2>Contract</h2>
 * <ul>
 *   <li>One allocator per task attempt, shared by its threads (from a thread the task started:
 *       {@link #get(TaskContext)}). It is a {@code RootAllocator} of its own (a
 *       {@link NativeArrowAllocator}), not a child of an executor-wide root: a task's leak cannot
 *       make a shared root unclosable, and its close can free exactly that task's buffers.
 *       Arrow's limit is unbounded; {@code spark.nativemem.taskLimit} and Spark's budget apply.
 *       Use child allocators ({@code newChildAllocator(name, 0, max)}) per operator if wanted:
 *       they inherit the charging listener.
 *   <li>Charged through a {@link NativeAllocationListener} in blocks of
 *       {@code spark.nativemem.arrowBlockSize} (8m): most buffers make no JNI call. When the task's
 *       budget is exhausted after spilling, an allocation fails with Arrow's
 *       {@code OutOfMemoryException} whose message is nativemem's usage report and whose cause is
 *       the {@link org.nativemem.NativeOutOfMemoryException} (the plugin counts and logs it like
 *       a native out-of-memory failure).
 *   <li>Closed when the task ends (success, failure or kill) by {@link TaskNativeMemory}'s
 *       completion listener, before the task's manager — so every Arrow byte is back in the
 *       manager, and the manager's bytes back in Spark, before Spark's leak check. Buffers still
 *       open then are freed and reported like native leaks, with Arrow's own leak text; for a task
 *       that succeeded that is a leak and, with {@code spark.unsafe.exceptionOnMemoryLeak=true},
 *       fails the task. Do not use the task's Arrow buffers after the task (or from threads that
 *       outlive it), and do not close the allocator yourself.
 *   <li>Outside a task, or after the task completed: {@link IllegalStateException}.
 *   <li>Needs Arrow Java on the classpath (Spark ships it: 12.0.1 in 3.5, 18.1.0 in 4.0). Nothing
 *       else in {@code org.nativemem.spark} refers to Arrow: without it, only this class fails.
 * </ul>
 */
public final class TaskArrowAllocator {
    private static final Logger LOG = LoggerFactory.getLogger(TaskArrowAllocator.class);

    /** The pool of the task's manager that Arrow buffers are charged to. */
    public static final String POOL = "arrow";

    /** Key of the allocator among the task's resources. */
    private static final Object KEY = new Object();

    private TaskArrowAllocator() {
    }

    /**
     * Returns the current task attempt's Arrow allocator, creating it (and the task's native
     * memory manager) on first use.
     *
     * @return the allocator; owned by the task, do not close it
     * @throws IllegalStateException if the calling thread is not running a Spark task, or the task
     *     has completed
     * @throws UnsatisfiedLinkError if the native library cannot be loaded
     */
    public static BufferAllocator get() {
        return nativeAllocator(requireTask()).allocator();
    }

    /**
     * Returns the Arrow allocator of task attempt {@code ctx}, creating it on first use (for
     * threads the task started: capture {@code TaskContext.get()} on the task thread).
     *
     * @param ctx a running task
     * @return the allocator; owned by the task, do not close it
     * @throws IllegalStateException if the task has completed
     */
    public static BufferAllocator get(TaskContext ctx) {
        return nativeAllocator(ctx).allocator();
    }

    /**
     * The task's allocator with its listener's counters (JNI calls, allocations), creating it on
     * first use. For diagnostics and tests.
     *
     * @param ctx a running task
     * @return the task's {@link NativeArrowAllocator}; owned by the task, do not close it
     * @throws IllegalStateException if the task has completed
     */
    public static NativeArrowAllocator nativeAllocator(TaskContext ctx) {
        if (ctx == null) {
            throw new IllegalStateException("nativemem: TaskArrowAllocator.get(null): no task");
        }
        return TaskNativeMemory.resource(ctx, KEY, TaskArrowAllocator::create).allocator;
    }

    private static TaskContext requireTask() {
        TaskContext ctx = TaskContext.get();
        if (ctx == null) {
            throw new IllegalStateException("nativemem: TaskArrowAllocator.get() called outside a Spark task (thread '"
                    + Thread.currentThread().getName() + "' has no TaskContext); call it from task code, or pass the"
                    + " task's TaskContext to get(TaskContext) from threads the task started");
        }
        return ctx;
    }

    private static ArrowResource create(NativeMemoryManager manager, NativeMemorySparkConf conf) {
        long block = conf == null ? NativeAllocationListener.DEFAULT_BLOCK_BYTES : conf.arrowBlockSizeBytes();
        NativeArrowAllocator allocator = NativeArrowAllocator.create(manager, "arrow of " + manager.name(), POOL, block);
        if (!allocator.freesLeakedMemory()) {
            LOG.warn("nativemem: {}: Arrow buffers a task leaks cannot be freed at its end (sun.misc.Unsafe is not"
                    + " reachable); they are reported only", manager.name());
        }
        return new ArrowResource(allocator);
    }

    /** The allocator as a resource of the task: closed before the manager. */
    private static final class ArrowResource implements TaskResource {
        final NativeArrowAllocator allocator;

        ArrowResource(NativeArrowAllocator allocator) {
            this.allocator = allocator;
        }

        @Override
        public long arrowAllocatedBytes() {
            return allocator.allocatedBytes();
        }

        @Override
        public Leak closeAtTaskEnd() {
            NativeAllocationListener l = allocator.listener();
            allocator.close();
            ArrowCloseReport report = allocator.closeReport();
            LOG.debug("nativemem: {}: closed; {} Arrow buffers ({} cumulative, peak {}), {} JNI calls", allocator.name(),
                    l.allocations(), Bytes.human(l.allocatedTotalBytes()), Bytes.human(l.peakAllocatedBytes()),
                    l.jniCalls());
            if (report == null || !report.hasLeaks()) {
                return null;
            }
            return new Leak(report.leakedBytes(), report.text());
        }

        @Override
        public String toString() {
            return allocator.toString();
        }
    }
}
