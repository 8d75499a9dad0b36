package org.nativemem.spark;

import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.function.BiFunction;

import org.apache.spark.SparkConf;
import org.apache.spark.SparkEnv;
import org.apache.spark.TaskContext;
import org.apache.spark.util.TaskCompletionListener;
import org.apache.spark.util.TaskFailureListener;
import org.nativemem.Bytes;
import org.nativemem.NativeCloseReport;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeMemoryStats;
import org.nativemem.NativeOutOfMemoryException;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The native memory manager of the current Spark task attempt.
 *
 * <pre>{@code
 * // inside a task (mapPartitions, a DataSource reader, a native operator's JNI entry point):
 * NativeMemoryManager mm = TaskNativeMemory.get();
 * long handle = mm.handle();                       // hand to native code of the same task
 * try (NativeReservation r = mm.newReservation("scan/arrow", 16L << 20)) { ... }
 * }</pre>
 *
 * <h2>Contract</h2>
 * <ul>
 *   <li>{@link #get()} returns the same manager for every call of one task attempt (from any
 *       thread, via {@link #get(TaskContext)} for threads the task started); the first call
 *       creates it, thread-safely, with a {@link SparkReservationListener} of the task's
 *       {@code TaskMemoryManager} and the {@code spark.nativemem.*} settings
 *       ({@link NativeMemorySparkConf}).
 *   <li>The first call also registers a task completion listener that closes the manager when
 *       the task ends — on success, failure and kill alike. Spark runs completion listeners
 *       inside the task, before its own managed-memory leak check, so every byte the manager
 *       reserved from Spark is back when Spark checks. Native memory still in use at that point
 *       (an operator that did not release it, typically a failed or killed task) is freed by the
 *       close and logged; for a task that succeeded it is a leak, and with
 *       {@code spark.unsafe.exceptionOnMemoryLeak=true} it fails the task as Spark does for its
 *       own leaks.
 *   <li>Per-task resources built on the manager (the task's Arrow allocator,
 *       {@link TaskArrowAllocator}) are closed by the same completion listener just before the
 *       manager, newest first, whatever order Spark runs completion listeners in. Arrow buffers
 *       still open then are freed and reported like native leaks (Arrow's own leak text
 *       included), and fail a successful task under {@code spark.unsafe.exceptionOnMemoryLeak=true}.
 *   <li>A failure listener registered at the same time logs, when the task fails with a
 *       {@link NativeOutOfMemoryException} and {@code spark.nativemem.logUsageOnOom=true}, the
 *       task's native usage report, what it holds from Spark and the effective settings.
 *   <li>Outside a task (no {@link TaskContext} on the thread), after the task completed, or once
 *       the manager is closed: {@link IllegalStateException}.
 *   <li>The manager is owned by the task: do not close it yourself (closing early is harmless,
 *       the completion listener then only records the totals).
 * </ul>
 *
 * <p>Executor-wide totals of the live managers and counters since the JVM started are in
 * {@link #executorStats()}, published as metrics by {@link NativeMemoryPlugin}. This class is the
 * task lifecycle; the counters are {@link ExecutorTotals}, which it and each task's
 * {@link SparkReservationListener} record into, and to which it adds the live managers on read.
 */
public final class TaskNativeMemory {
    private static final Logger LOG = LoggerFactory.getLogger(TaskNativeMemory.class);
    private static final String EXCEPTION_ON_LEAK = "spark.unsafe.exceptionOnMemoryLeak";

    /** Live task managers by task attempt id (unique within an application). */
    private static final ConcurrentHashMap<Long, TaskEntry> LIVE = new ConcurrentHashMap<>();

    /** Where the task lifecycle and the tasks' Spark listeners record the executor's counters. */
    private static final ExecutorTotals TOTALS = ExecutorTotals.EXECUTOR;

    private TaskNativeMemory() {
    }

    /**
     * Returns the current task attempt's manager, creating it on first use.
     *
     * @return the manager; owned by the task, do not close it
     * @throws IllegalStateException if the calling thread is not running a Spark task, or the task
     *     has completed
     * @throws IllegalArgumentException if a {@code spark.nativemem.*} setting is invalid
     * @throws UnsatisfiedLinkError if the native library cannot be loaded
     */
    public static NativeMemoryManager get() {
        return get(requireTask("get()"));
    }

    /**
     * Returns the manager of the task attempt {@code ctx}, creating it on first use. For threads
     * the task started (they have no {@code TaskContext} of their own): capture
     * {@code TaskContext.get()} on the task thread and pass it.
     *
     * @param ctx a running task
     * @return the manager; owned by the task, do not close it
     * @throws IllegalStateException if the task has completed, or this Spark lacks a member of its
     *     API that nativemem calls ({@link SparkApiCheck})
     * @throws IllegalArgumentException if a {@code spark.nativemem.*} setting is invalid
     * @throws UnsatisfiedLinkError if the native library cannot be loaded
     */
    public static NativeMemoryManager get(TaskContext ctx) {
        if (ctx == null) {
            throw new IllegalStateException("nativemem: TaskNativeMemory.get(null): no task");
        }
        long id = ctx.taskAttemptId();
        TaskEntry entry = LIVE.get(id);
        if (entry == null) {
            SparkApiCheck.verify(); // once per JVM; then a volatile read (also without the plugin)
            TaskEntry fresh = new TaskEntry(ctx);
            entry = LIVE.putIfAbsent(id, fresh);
            if (entry == null) {
                entry = fresh;
            }
        }
        if (entry.ctx != ctx) {
            throw new IllegalStateException("nativemem: task attempt " + id + " already has a native memory manager"
                    + " of another TaskContext (" + entry.name + "); it was not closed when its task ended");
        }
        return entry.manager();
    }

    /**
     * @return the current task's manager if {@link #get()} created one and it is open, else null
     *     (never creates one; null outside a task)
     */
    public static NativeMemoryManager getIfCreated() {
        TaskContext ctx = TaskContext.get();
        TaskEntry entry = ctx == null ? null : LIVE.get(ctx.taskAttemptId());
        return entry == null || entry.closed ? null : entry.published;
    }

    /**
     * @return the Spark consumer behind the current task's manager, or null if there is none (for
     *     diagnostics and tests: {@link SparkReservationListener#heldBytes()} is what Spark counts)
     */
    public static SparkReservationListener listener() {
        TaskContext ctx = TaskContext.get();
        TaskEntry entry = ctx == null ? null : LIVE.get(ctx.taskAttemptId());
        return entry == null || entry.published == null ? null : entry.listener;
    }

    /**
     * Totals over this JVM's live task managers and counters since the JVM started (see
     * {@link ExecutorNativeMemoryStats}). Cheap enough for a metrics poll: a few native reads per
     * running task.
     *
     * @return a snapshot
     */
    public static ExecutorNativeMemoryStats executorStats() {
        ExecutorTotals.Sum sum = TOTALS.sum();
        for (TaskEntry entry : LIVE.values()) {
            entry.addTo(sum);
        }
        return sum.build();
    }

    /**
     * Returns the resource of task attempt {@code ctx} registered under {@code key}, creating it
     * with {@code create} (given the task's manager, created first if needed, and the settings)
     * on first use. The task's completion listener closes it before the manager. {@code create}
     * runs under the task entry's lock, once per task and key; it must not call back into this
     * class for the same task.
     *
     * @throws IllegalStateException if the task has completed (nothing is created then)
     */
    static <T extends TaskResource> T resource(TaskContext ctx, Object key,
            BiFunction<NativeMemoryManager, NativeMemorySparkConf, T> create) {
        NativeMemoryManager m = get(ctx);
        TaskEntry entry = LIVE.get(ctx.taskAttemptId());
        if (entry == null || entry.ctx != ctx) {
            throw new IllegalStateException("nativemem: " + SparkReservationListener.taskName(ctx)
                    + " has completed; its native memory manager is closed");
        }
        return entry.resource(m, key, create);
    }

    static TaskContext requireTask(String what) {
        TaskContext ctx = TaskContext.get();
        if (ctx == null) {
            throw new IllegalStateException("nativemem: TaskNativeMemory." + what + " called outside a Spark task"
                    + " (thread '" + Thread.currentThread().getName() + "' has no TaskContext); call it from task"
                    + " code, or pass the task's TaskContext to get(TaskContext) from threads the task started");
        }
        return ctx;
    }

    private static Throwable findOom(Throwable error) {
        for (Throwable t = error; t != null; t = t.getCause() == t ? null : t.getCause()) {
            if (t instanceof NativeOutOfMemoryException) {
                return t;
            }
        }
        return null;
    }

    /** One task attempt: its manager, created on first use, closed at completion. */
    private static final class TaskEntry {
        final TaskContext ctx;
        final long id;
        final String name;
        /** Set once, under this entry's monitor, before {@link #published}. */
        SparkReservationListener listener;
        NativeMemorySparkConf conf;
        /** The open manager, or null before creation. */
        volatile NativeMemoryManager published;
        volatile boolean closed;
        /** Guarded by this. */
        private boolean listenersRegistered;
        /** Resources by key, guarded by this; closed before the manager. */
        private final Map<Object, TaskResource> resources = new HashMap<>();
        /** The resources in creation order: an immutable copy, replaced under this. */
        volatile List<TaskResource> resourceList = Collections.emptyList();

        TaskEntry(TaskContext ctx) {
            this.ctx = ctx;
            this.id = ctx.taskAttemptId();
            this.name = SparkReservationListener.taskName(ctx);
        }

        NativeMemoryManager manager() {
            NativeMemoryManager m = published;
            if (m != null && !closed) {
                return m;
            }
            synchronized (this) {
                if (closed) {
                    throw new IllegalStateException("nativemem: " + name
                            + " has completed; its native memory manager is closed");
                }
                if (published != null) {
                    return published;
                }
                if (ctx.isCompleted()) {
                    throw new IllegalStateException("nativemem: " + name
                            + " has completed; a native memory manager cannot be created for it any more");
                }
                try {
                    return create();
                } catch (RuntimeException | Error e) {
                    if (published == null) { // nothing was created: forget the entry
                        LIVE.remove(id, this);
                    }
                    throw e;
                }
            }
        }

        /** Adds this task's manager and Arrow allocators to {@code sum}, if the manager is open. */
        void addTo(ExecutorTotals.Sum sum) {
            NativeMemoryManager m = published;
            if (m == null || closed) {
                return;
            }
            for (TaskResource r : resourceList) {
                long bytes;
                try {
                    bytes = r.arrowAllocatedBytes();
                } catch (RuntimeException closedMeanwhile) {
                    continue;
                }
                if (bytes >= 0) {
                    sum.addArrowAllocator(bytes);
                }
            }
            NativeMemoryStats s;
            try {
                s = m.stats();
            } catch (IllegalStateException closedMeanwhile) {
                return;
            }
            sum.addManager(s, listener.getUsed());
        }

        @SuppressWarnings("unchecked")
        synchronized <T extends TaskResource> T resource(NativeMemoryManager m, Object key,
                BiFunction<NativeMemoryManager, NativeMemorySparkConf, T> create) {
            if (closed || published != m) {
                throw new IllegalStateException("nativemem: " + name + " has completed; its native memory manager"
                        + " is closed");
            }
            TaskResource existing = resources.get(key);
            if (existing != null) {
                return (T) existing;
            }
            T created = create.apply(m, conf);
            resources.put(key, created);
            List<TaskResource> list = new ArrayList<>(resourceList);
            list.add(created);
            resourceList = Collections.unmodifiableList(list);
            return created;
        }

        /**
         * Closes the resources, newest first, before the manager. Returns the leak to report for a
         * successful task under exceptionOnLeak, or null.
         */
        private String closeResources(List<TaskResource> list, boolean exceptionOnLeak) {
            long bytes = 0;
            StringBuilder texts = new StringBuilder();
            for (int i = list.size() - 1; i >= 0; i--) {
                TaskResource.Leak leak;
                try {
                    leak = list.get(i).closeAtTaskEnd();
                } catch (RuntimeException | Error e) {
                    TOTALS.closeFailed();
                    LOG.error("nativemem: {}: closing a per-task resource ({}) failed", name, list.get(i), e);
                    continue;
                }
                if (leak != null) {
                    bytes += leak.bytes;
                    texts.append(texts.length() == 0 ? "" : "\n").append(leak.text);
                }
            }
            if (texts.length() == 0) {
                return null;
            }
            TOTALS.arrowReclaimedAtClose(bytes);
            String what = "nativemem: " + name + (ctx.isFailed() ? " failed" : " succeeded") + " with Arrow buffers"
                    + " still open (" + Bytes.human(bytes) + "); closing its Arrow allocator freed them: " + texts;
            if (ctx.isFailed()) {
                LOG.info(what);
                return null;
            }
            LOG.warn(what);
            return exceptionOnLeak ? what : null;
        }

        /** Under this entry's monitor. */
        private NativeMemoryManager create() {
            SparkEnv env = SparkEnv.get();
            if (env == null) {
                throw new IllegalStateException("nativemem: " + name + ": no SparkEnv in this JVM");
            }
            SparkConf sparkConf = env.conf();
            NativeMemorySparkConf settings = NativeMemorySparkConf.fromSparkConf(sparkConf);
            boolean exceptionOnLeak = sparkConf.getBoolean(EXCEPTION_ON_LEAK, false);
            SparkReservationListener l = SparkReservationListener.forTask(ctx, settings, TOTALS);
            NativeMemoryManager m = NativeMemoryManager.create(name, l, settings.toNativeConfig());
            l.attach(m);
            this.listener = l;
            this.conf = settings;
            TOTALS.managerCreated();
            // Published before the listeners are registered: Spark runs a completion listener
            // added to a task that completed meanwhile right away, and it must find the manager.
            published = m;
            try {
                registerListeners(exceptionOnLeak);
            } catch (RuntimeException | Error e) {
                complete(false);
                throw e;
            }
            if (closed) { // the task completed concurrently and the listener already ran
                throw new IllegalStateException("nativemem: " + name + " has completed; its native memory manager is closed");
            }
            LOG.debug("nativemem: {}: created native memory manager ({}, {})", name, l.getMode(), settings);
            return m;
        }

        private void registerListeners(final boolean exceptionOnLeak) {
            if (listenersRegistered) {
                return;
            }
            listenersRegistered = true;
            // Failure listeners run before completion listeners, while the manager is still open.
            ctx.addTaskFailureListener(new TaskFailureListener() {
                @Override
                public void onTaskFailure(TaskContext context, Throwable error) {
                    onFailure(error);
                }
            });
            ctx.addTaskCompletionListener(new TaskCompletionListener() {
                @Override
                public void onTaskCompletion(TaskContext context) {
                    complete(exceptionOnLeak);
                }
            });
        }

        private void onFailure(Throwable error) {
            try {
                Throwable oom = findOom(error);
                if (oom == null) {
                    return;
                }
                TOTALS.oomFailure();
                NativeMemoryManager m = published; // read first: publishes conf and listener
                if (conf == null || !conf.logUsageOnOom() || m == null) {
                    return;
                }
                String report;
                try {
                    report = m.usageReport();
                } catch (IllegalStateException closedMeanwhile) {
                    report = "(manager closed)";
                }
                String first = String.valueOf(oom.getMessage());
                int nl = first.indexOf('\n');
                LOG.error("nativemem: {} failed with a native out-of-memory error: {}\n"
                        + "Native usage when the task failed:\n{}\n"
                        + "Held from Spark: {} {} (peak {}); Spark spill requests: {} ({} released); "
                        + "Spark granted less than asked {} times.\nEffective config: {}, {}",
                        name, nl < 0 ? first : first.substring(0, nl), report, Bytes.human(listener.heldBytes()),
                        listener.getMode(), Bytes.human(listener.peakHeldBytes()), listener.spillRequests(),
                        Bytes.human(listener.spilledBytes()), listener.shortGrants(), conf, m.config());
            } catch (RuntimeException e) {
                LOG.warn("nativemem: {}: could not log the native usage on failure", name, e);
            }
        }

        /** The completion listener: close, account, hand the peak to Spark's task metrics. */
        private void complete(boolean exceptionOnLeak) {
            // The process view at the task's end, while its manager still counts as nativemem's
            // (not yet closed): what the task held is not mistaken for untracked memory.
            try {
                ExecutorMemory.get().sampleIfDue();
            } catch (RuntimeException e) {
                LOG.debug("nativemem: {}: memory sample failed", name, e);
            }
            NativeMemoryManager m;
            List<TaskResource> toClose;
            synchronized (this) {
                if (closed) {
                    return;
                }
                closed = true;
                m = published;
                toClose = resourceList;
            }
            String leak = null;
            try {
                if (m == null) {
                    return;
                }
                // Resources built on the manager first (their bytes go back to it), then the manager.
                leak = closeResources(toClose, exceptionOnLeak);
                SparkReservationListener l = listener;
                l.beginClose();
                NativeMemoryStats before = null;
                try {
                    before = m.stats();
                } catch (IllegalStateException closedAlready) {
                    // closed by its user: nothing to measure
                }
                boolean closedOk = true;
                try {
                    m.close();
                } catch (RuntimeException e) {
                    closedOk = false;
                    TOTALS.closeFailed();
                    LOG.error("nativemem: {}: closing the native memory manager failed; Spark frees what it still"
                            + " holds for the task and reports it as a leak", name, e);
                }
                if (before != null) {
                    TOTALS.heldAtClose(before);
                }
                NativeCloseReport result = m.closeReport();
                String report = result == null ? null : result.text();
                if (closedOk && result != null && result.hasLeaks()) {
                    // Open reservations or live allocations (operator state attached to the manager
                    // and released by its close is not a leak).
                    String what = "nativemem: " + name + (ctx.isFailed() ? " failed" : " succeeded")
                            + " with native memory still in use; closing its manager freed it: " + report;
                    if (ctx.isFailed()) {
                        LOG.info(what);
                    } else {
                        LOG.warn(what);
                        if (exceptionOnLeak) {
                            leak = leak == null ? what : leak + "\n" + what;
                        }
                    }
                }
                // Spark's "peak execution memory" of the task: what it held from Spark at its peak
                // (native peak rounded up to reservation blocks).
                ctx.taskMetrics().incPeakExecutionMemory(l.peakHeldBytes());
                // Spill (Memory) and the nativemem.* task accumulators (never throws), unless
                // spark.nativemem.metrics.enabled=false.
                NativeMemorySparkConf c = conf;
                if (c == null || c.metricsEnabled()) {
                    NativeTaskMetrics.recordAtClose(ctx, before, l.spilledBytes(), result);
                }
                long held = l.heldBytes();
                l.detach();
                if (held != 0) {
                    TOTALS.unreturned(held);
                    LOG.error("nativemem: {}: {} still held from Spark after the close", name, Bytes.human(held));
                }
                TOTALS.managerClosed();
                LOG.debug("nativemem: {}: closed (peak {}, held from Spark at peak {})", name,
                        before == null ? "?" : Bytes.human(before.peakBytes()), Bytes.human(l.peakHeldBytes()));
            } finally {
                LIVE.remove(id, this);
            }
            if (leak != null) {
                throw new IllegalStateException(leak + " (" + EXCEPTION_ON_LEAK + "=true)");
            }
        }
    }
}
