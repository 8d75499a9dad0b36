package org.nativemem.spark;

import java.io.IOException;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.spark.TaskContext;
import org.apache.spark.memory.MemoryConsumer;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.nativemem.Bytes;
import org.nativemem.NativeMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.ReservationListener;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The bridge between a task's {@link NativeMemoryManager} and Spark's {@link TaskMemoryManager}:
 * a {@link MemoryConsumer} of the task whose bytes are the native manager's reserved bytes.
 *
 * <pre>
 *   native grow ──cushion empty──▶ reserve(n)   ──▶ TaskMemoryManager.acquireExecutionMemory(n, this)
 *                                                    (Spark may spill other consumers for it)
 *   native release / close ──────▶ unreserve(n) ──▶ TaskMemoryManager.releaseExecutionMemory(n, this)
 *   Spark needs memory ──────────▶ spill(n, trigger) ──▶ manager.reclaim(n): unused cushion
 *                                                    first, then native spillers; returns the bytes
 *                                                    unreserve()d during the call
 * </pre>
 *
 * <h2>Memory mode</h2>
 * {@link MemoryMode#OFF_HEAP} when {@code spark.memory.offHeap.enabled=true}: native memory is
 * then budgeted by {@code spark.memory.offHeap.size}, which is what it is. Otherwise
 * {@link MemoryMode#ON_HEAP}: native bytes are counted against the JVM heap's execution pool
 * (Spark has no other budget to give), logged once per JVM as a warning. Spark answers an
 * OFF_HEAP request with 0 bytes, silently, when off-heap memory is disabled; this class refuses to
 * be built in that state ({@link IllegalStateException}) instead of accepting such grants.
 *
 * <h2>Threads and locks</h2>
 * {@link #reserve(long)} and {@link #unreserve(long)} may be called from any thread (task threads,
 * native operator threads, and another task's thread when executor-wide arbitration has this task
 * hand its idle memory back). Neither takes the {@code TaskMemoryManager}'s monitor itself:
 * {@code reserve} calls {@code TaskMemoryManager.acquireExecutionMemory(n, this)}, which takes it
 * (Spark's own lock order: task monitor, then the memory manager's lock), and {@code unreserve}
 * calls {@code TaskMemoryManager.releaseExecutionMemory(n, this)}, which takes only the memory
 * manager's lock. That matters when another task's thread gives this task's memory back: a thread
 * of this task may hold the monitor while Spark makes it <i>wait</i> for memory (a task under 1/2N
 * of the pool waits on the memory manager's lock, releasing that lock but not the monitor); a
 * release through the monitor would wait for that task, and the memory it would free is what
 * could wake it. The bytes held from Spark are this class's own atomic count, which
 * {@link #getUsed()} returns (Spark reads a consumer's use only through {@code getUsed()}); the
 * {@code used} field of {@code MemoryConsumer} is never touched (see "Spark versions").
 *
 * <h2>Spark versions</h2>
 * Only public methods of {@code TaskMemoryManager} and {@code MemoryConsumer} are called, and no
 * field of theirs but the final {@code taskMemoryManager}: the protected {@code used} field is a
 * {@code long} up to Spark 4.1 (updated without any lock by {@code acquireMemory} /
 * {@code freeMemory}) and an {@code AtomicLong} from 4.2, so code that touches it links on one
 * side of that change only, and a plain {@code long} cannot be updated from two threads. The
 * bytes held from Spark are counted here ({@link #heldBytes()}), which also keeps counting after
 * the listener is detached from Spark. {@link SparkApiCheck} verifies at executor start that
 * every member this package calls exists (and that this class, which overrides
 * {@code getUsed()}, loads). Spark calls {@link #spill(long, MemoryConsumer)} while holding the
 * task's monitor; {@code spill} takes no other lock (the native side holds none during upcalls),
 * so a native thread blocked in {@code reserve} cannot deadlock against it.
 *
 * <h2>Lifecycle</h2>
 * Created before its manager (the manager needs the listener), then {@linkplain #attach attached}.
 * {@link TaskNativeMemory} closes the manager in a task completion listener; from the moment the
 * close starts {@code spill} returns 0 (a spill racing with close on another thread is answered
 * with nothing, never an exception) and {@code reserve} grants nothing. After the close the
 * listener is detached from Spark: Spark cleans up the task's memory right after its completion
 * listeners, so a late {@code unreserve} (a close deferred by a straggling native thread) only
 * updates this object's count and does not release memory Spark already reclaimed.
 */
public final class SparkReservationListener extends MemoryConsumer implements ReservationListener {
    private static final Logger LOG = LoggerFactory.getLogger(SparkReservationListener.class);
    private static final AtomicBoolean ON_HEAP_WARNED = new AtomicBoolean();

    private static final int OPEN = 0;
    private static final int CLOSING = 1;
    private static final int DETACHED = 2;

    private final String taskName;
    /** Where Spark's spill requests are counted for the executor (its gauges read them live). */
    private final ExecutorTotals totals;
    private volatile NativeMemoryManager manager;
    private volatile int state = OPEN;
    /** Bytes held from Spark now (what {@link #getUsed()} tells Spark). */
    private final AtomicLong held = new AtomicLong();
    /** Highest {@code held}. */
    private final AtomicLong peakHeld = new AtomicLong();
    private final AtomicLong spillRequests = new AtomicLong();
    private final AtomicLong spilledBytes = new AtomicLong();
    private final AtomicLong reserveRequests = new AtomicLong();
    private final AtomicLong shortGrants = new AtomicLong();

    /**
     * Creates a consumer of {@code tmm} in the given mode. Spark's spill requests it answers count
     * in the executor's totals ({@link ExecutorNativeMemoryStats#sparkSpillRequests()}).
     *
     * @param tmm the task's memory manager
     * @param mode {@code OFF_HEAP} only if Spark's off-heap execution memory is enabled
     * @param taskName the task in logs and in Spark's memory usage dumps, e.g. {@code "task 12 (stage 3.0)"}
     * @throws IllegalStateException if {@code mode} is {@code OFF_HEAP} but the task memory manager
     *     has no off-heap memory ({@code spark.memory.offHeap.enabled=false}): Spark would grant 0
     *     bytes to every request
     */
    public SparkReservationListener(TaskMemoryManager tmm, MemoryMode mode, String taskName) {
        this(tmm, mode, taskName, ExecutorTotals.EXECUTOR);
    }

    SparkReservationListener(TaskMemoryManager tmm, MemoryMode mode, String taskName, ExecutorTotals totals) {
        super(tmm, tmm.pageSizeBytes(), mode);
        this.taskName = taskName;
        this.totals = totals;
        if (mode == MemoryMode.OFF_HEAP && tmm.getTungstenMemoryMode() != MemoryMode.OFF_HEAP) {
            throw new IllegalStateException("nativemem: " + taskName + ": an OFF_HEAP consumer needs "
                    + NativeMemorySparkConf.SPARK_OFF_HEAP_ENABLED + "=true and spark.memory.offHeap.size > 0;"
                    + " with off-heap memory disabled Spark grants 0 bytes OFF_HEAP to every request");
        }
    }

    /**
     * Creates the consumer for a task, in the mode its configuration calls for (see the class
     * documentation), logging the ON_HEAP warning once per JVM.
     *
     * @param ctx the task
     * @param conf the application's nativemem settings
     * @return a new consumer, not yet attached
     */
    public static SparkReservationListener forTask(TaskContext ctx, NativeMemorySparkConf conf) {
        return forTask(ctx, conf, ExecutorTotals.EXECUTOR);
    }

    /** {@link #forTask(TaskContext, NativeMemorySparkConf)}, counting Spark's spill requests in {@code totals}. */
    static SparkReservationListener forTask(TaskContext ctx, NativeMemorySparkConf conf, ExecutorTotals totals) {
        MemoryMode mode = conf.offHeapEnabled() ? MemoryMode.OFF_HEAP : MemoryMode.ON_HEAP;
        if (mode == MemoryMode.ON_HEAP) {
            warnOnHeapOnce();
        }
        return new SparkReservationListener(ctx.taskMemoryManager(), mode, taskName(ctx), totals);
    }

    /** Logs, once per JVM (driver and executor share one in local mode), that ON_HEAP is used. */
    static void warnOnHeapOnce() {
        if (ON_HEAP_WARNED.compareAndSet(false, true)) {
            LOG.warn("nativemem: {} is false: native memory is accounted against Spark's ON_HEAP execution"
                    + " memory (the JVM heap). Set {}=true and spark.memory.offHeap.size to give native memory"
                    + " its own budget.", NativeMemorySparkConf.SPARK_OFF_HEAP_ENABLED,
                    NativeMemorySparkConf.SPARK_OFF_HEAP_ENABLED);
        }
    }

    static String taskName(TaskContext ctx) {
        return "task " + ctx.taskAttemptId() + " (stage " + ctx.stageId() + "." + ctx.stageAttemptNumber()
                + ", partition " + ctx.partitionId() + ", attempt " + ctx.attemptNumber() + ")";
    }

    /**
     * Connects the manager this listener serves, so {@link #spill(long, MemoryConsumer)} can reach
     * it. Call once, right after {@code NativeMemoryManager.create(name, this, config)}.
     *
     * @param manager the manager created with this listener
     * @throws IllegalStateException if a manager is attached already
     */
    public void attach(NativeMemoryManager manager) {
        synchronized (this) {
            if (this.manager != null) {
                throw new IllegalStateException("nativemem: " + taskName + ": a manager is attached already");
            }
            this.manager = manager;
        }
    }

    /** From now on spill returns 0 and reserve grants nothing (the manager is being closed). */
    void beginClose() {
        if (state == OPEN) {
            state = CLOSING;
        }
    }

    /** From now on unreserve no longer calls Spark (Spark cleans up the task's memory itself). */
    void detach() {
        state = DETACHED;
    }

    /**
     * Asks Spark for {@code bytes} of execution memory for the native manager. Spark may spill
     * other consumers of the task (JVM operators) to grant it.
     *
     * @param bytes bytes wanted, {@code > 0}
     * @return bytes granted, {@code 0 <= granted <= bytes}; 0 once the manager is closing
     */
    @Override
    public long reserve(long bytes) {
        if (bytes <= 0 || state != OPEN) {
            return 0;
        }
        reserveRequests.incrementAndGet();
        // Spark may call spill(.., this) from inside, on this thread: its unreserve lowers `held`
        // before this raises it, as Spark's own acquireMemory does with `used`.
        long granted = taskMemoryManager.acquireExecutionMemory(bytes, this);
        if (granted > 0) {
            peakHeld.accumulateAndGet(held.addAndGet(granted), Math::max);
        }
        if (granted < bytes) {
            shortGrants.incrementAndGet();
            LOG.debug("nativemem: {}: Spark granted {} of {} asked ({})", taskName, Bytes.human(granted),
                    Bytes.human(bytes), getMode());
        }
        return granted;
    }

    /**
     * Gives {@code bytes} back to Spark. Takes no task monitor (see "Threads and locks"): safe to
     * call from another task's thread while a thread of this task waits inside Spark.
     *
     * @param bytes bytes released, {@code > 0}
     * @throws IllegalStateException if {@code bytes} exceeds what this consumer holds (the native
     *     side then keeps counting them; nothing changes here or in Spark)
     */
    @Override
    public void unreserve(long bytes) {
        if (bytes <= 0) {
            return;
        }
        long now;
        do {
            now = held.get();
            if (bytes > now) {
                throw new IllegalStateException("nativemem: " + taskName + ": asked to release " + bytes
                        + " bytes but holds only " + now + " bytes from Spark");
            }
        } while (!held.compareAndSet(now, now - bytes));
        if (state != DETACHED) {
            taskMemoryManager.releaseExecutionMemory(bytes, this);
        }
    }

    /**
     * What this consumer holds from Spark: the native manager's reserved bytes. Spark reads it to
     * choose whom to spill and in its memory usage dumps.
     *
     * @return bytes held from Spark now
     */
    @Override
    public long getUsed() {
        return held.get();
    }

    /**
     * Spark wants memory back (another consumer of the task, or this one, needs it): hands back
     * the manager's unused reserved bytes, then spills native consumers. The bytes are released
     * to Spark through {@link #unreserve(long)} before this returns.
     *
     * @param size bytes Spark wants
     * @param trigger the consumer that needs them
     * @return bytes released to Spark during this call; 0 if there was nothing to give, or the
     *     manager is not attached, closing or closed
     * @throws IOException if a native spiller or the release failed (Spark reports it as an
     *     out-of-memory error of the requesting consumer); the cause is kept
     */
    @Override
    public long spill(long size, MemoryConsumer trigger) throws IOException {
        NativeMemoryManager m = manager;
        if (size <= 0 || m == null || state != OPEN) {
            return 0;
        }
        spillRequests.incrementAndGet();
        long released;
        try {
            released = m.reclaim(size);
        } catch (IllegalStateException e) {
            if (m.isClosed() || state != OPEN) {
                return 0; // closed concurrently: nothing to give, and not an error
            }
            throw e;
        } catch (NativeMemoryException e) {
            throw new IOException("nativemem: " + taskName + ": giving " + Bytes.human(size)
                    + " of native memory back to Spark failed: " + e.getMessage(), e);
        }
        spilledBytes.addAndGet(released);
        totals.sparkSpill(released);
        if (released > 0) {
            LOG.info("nativemem: {}: Spark asked for {} (for {}), released {}", taskName, Bytes.human(size),
                    trigger == this ? "itself" : trigger, Bytes.human(released));
        } else {
            LOG.debug("nativemem: {}: Spark asked for {} (for {}), nothing to release", taskName,
                    Bytes.human(size), trigger == this ? "itself" : trigger);
        }
        return released;
    }

    /** @return the manager attached, or null */
    public NativeMemoryManager manager() {
        return manager;
    }

    /** @return the task this consumer belongs to, as it appears in logs */
    public String taskName() {
        return taskName;
    }

    /** @return the highest {@link #heldBytes()} so far: the task's peak of native memory held from Spark, bytes */
    public long peakHeldBytes() {
        return peakHeld.get();
    }

    /** @return bytes held from Spark now (the same as {@link #getUsed()}) */
    public long heldBytes() {
        return held.get();
    }

    /** @return calls of {@link #spill(long, MemoryConsumer)} that reached the manager */
    public long spillRequests() {
        return spillRequests.get();
    }

    /** @return bytes released to Spark by those spill calls */
    public long spilledBytes() {
        return spilledBytes.get();
    }

    /** @return calls of {@link #reserve(long)} that asked Spark */
    public long reserveRequests() {
        return reserveRequests.get();
    }

    /** @return reserve calls Spark answered with less than asked */
    public long shortGrants() {
        return shortGrants.get();
    }

    @Override
    public String toString() {
        return "nativemem[" + taskName + ", " + getMode() + "]";
    }
}
