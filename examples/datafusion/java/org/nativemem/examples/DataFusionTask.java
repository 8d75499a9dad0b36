package org.nativemem.examples;

import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.util.Objects;

import org.apache.spark.TaskContext;
import org.apache.spark.util.TaskCompletionListener;
import org.nativemem.EngineLibrary;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeObject;
import org.nativemem.NativeOutOfMemoryException;

/**
 * A DataFusion engine working for one task: queries run natively on DataFusion's threads, and
 * every byte DataFusion's operators account is charged to the task's {@link NativeMemoryManager}.
 *
 * <pre>{@code
 * NativeMemoryManager mm = TaskNativeMemory.get();                    // in a Spark task
 * try (DataFusionTask df = DataFusionTask.open(mm)) {                 // pool "datafusion", answers Spark
 *     df.start(DataFusionTask.Query.ORDER_BY, 3_000_000);             // returns at once
 *     ...                                                             // the task thread is free meanwhile
 *     DataFusionStats s = df.await();                                 // rows, digest, spills, yields
 * }                                                                   // everything released
 * }</pre>
 *
 * <h2>Where it runs</h2>
 * The engine is its own native library, {@code libnativemem_df_engine} (shipped in
 * {@code nativemem-examples.jar} at {@code org/nativemem/examples/native/<os>-<arch>/}, loaded on
 * first use after nativemem's own library; override:
 * {@code -D}{@value #LIBRARY_PATH_PROPERTY}{@code =<file>}). It reaches the manager only through
 * the engine ABI ({@link NativeMemoryManager#nativeApi()}, {@link NativeMemoryManager#handle()}).
 * Queries run on the engine's own Tokio runtime (one per JVM, 2 worker threads, shared by every
 * open task) with {@code partitions} target partitions; the data is generated natively
 * ({@code generate_series}), see {@link Query}.
 *
 * <h2>Memory: DataFusion on nativemem's pool</h2>
 * DataFusion's memory pool of this task is the pool {@code poolPath} of the manager: each
 * DataFusion consumer (an {@code ExternalSorter}, a {@code GroupedHashAggregateStream}) is a
 * reservation there. A {@code try_grow} charges the manager, which takes whole blocks from Spark's
 * execution memory of the task (Spark may spill the task's other {@code MemoryConsumer}s for it:
 * DataFusion → Spark); a refused {@code try_grow} makes the operator spill as DataFusion intends,
 * and fails the query only when the operator cannot spill ({@link DataFusionQueryException} with
 * {@link DataFusionQueryException#resourcesExhausted()} and nativemem's usage report).
 *
 * <h2>Spark → DataFusion ({@code answerSpillRequests})</h2>
 * With {@code answerSpillRequests} the pool registers a native spiller: when the task's manager
 * is asked for memory (in Spark: another consumer of the task needs memory and Spark calls
 * nativemem's {@code MemoryConsumer.spill}; or a grow of another native pool), nativemem first
 * hands back its unused cushion, then asks this pool, which marks its spillable consumers: the
 * <em>next</em> {@code try_grow} of each is refused, so it spills, and the bytes it frees go back
 * to Spark as they are released. The semantics Spark sees:
 * <ul>
 *   <li>{@code spill()} returns at once with what could be released during the call (the cushion);
 *       it never waits for DataFusion, so it cannot deadlock when the asking thread is the task
 *       thread or a DataFusion thread holding Spark's {@code TaskMemoryManager} monitor;
 *   <li>the rest follows asynchronously, as the marked operators reach their next
 *       {@code try_grow} (typically within a batch); the consumer that asked gets a short grant
 *       and finds the memory free when it asks again;
 *   <li>a marked operator spills instead of failing: a yield is never a query failure.
 * </ul>
 * Without it the pool only spills on its own refusals, like DataFusion's own pools.
 *
 * <h2>The comparison mode ({@code perCallConsumer})</h2>
 * A non-null {@code perCallConsumer} replaces nativemem by the design of Apache DataFusion Comet:
 * the engine's pool calls the consumer's public {@code long acquireMemory(long)} on every
 * {@code try_grow} / {@code grow} and {@code void freeMemory(long)} on every shrink, through JNI,
 * from DataFusion's threads (a grant smaller than asked is freed back and the {@code try_grow}
 * refused). nativemem is not charged at all, and Spark cannot take memory back: such a consumer's
 * {@code spill} answers 0, as Comet's does. Pass a Spark
 * {@code org.apache.spark.memory.MemoryConsumer} of the task (it must be thread-safe: the calls
 * come from several threads). Declared as {@code Object} so that this class does not need Spark
 * on the class path unless it is used in a Spark task.
 *
 * <h2>Contract</h2>
 * <ul>
 *   <li>One query at a time: {@link #start} returns at once; {@link #await()} blocks until it
 *       finished and returns its {@link DataFusionStats}, or throws its
 *       {@link DataFusionQueryException}; either way the task can start another query.
 *       {@link #start} while a query runs, and {@link #await()} before any {@link #start}, throw
 *       {@link IllegalStateException}.
 *   <li>{@link #stats()} may be called at any time from any thread (while a query runs
 *       {@link DataFusionStats#finished()} is false).
 *   <li>{@link #close()} cancels a running query, waits for DataFusion to stop and releases every
 *       byte; idempotent and thread-safe. After it, every method but {@code close},
 *       {@link #isClosed()} and the getters throws {@link IllegalStateException}.
 *   <li>In a Spark task (a {@link TaskContext} on the thread that calls {@link #open}), a task
 *       completion listener closes it when the task ends. Spark runs completion listeners newest
 *       first, so it closes before the task's manager, whose listener
 *       {@code TaskNativeMemory.get()} registered earlier: open it after getting the manager (as
 *       in the example). Opened from another thread, close it yourself before the task ends.
 *   <li>The manager must stay open while the task is open: close the task first.
 * </ul>
 * Not charged to the pool: DataFusion's memory outside its pool accounting (plan, small buffers
 * of streams, the Tokio runtime).
 */
public final class DataFusionTask extends NativeObject {
    /** System property naming a library file to load instead of the packed one. */
    public static final String LIBRARY_PATH_PROPERTY = "nativemem.dfengine.library.path";
    /** Default pool path: {@code datafusion}, directly below the task's root pool. */
    public static final String DEFAULT_POOL_PATH = "datafusion";
    /** Default target partitions: 2 (the engine's runtime has 2 worker threads). */
    public static final int DEFAULT_PARTITIONS = 2;
    /** Most target partitions the engine takes. */
    public static final int MAX_PARTITIONS = 64;

    private static final EngineLibrary LIBRARY = new EngineLibrary(DataFusionTask.class, "nativemem_df_engine",
            "org/nativemem/examples/native", LIBRARY_PATH_PROPERTY);

    /** Whether Spark is on the class path (looked up without initializing anything). */
    private static final boolean SPARK_PRESENT = isPresent("org.apache.spark.TaskContext");

    /** The queries the engine knows; the data is generated natively. */
    public enum Query {
        /**
         * {@code SELECT v FROM (SELECT (value * 7919) % 10000019 AS v FROM generate_series(1, rows))
         * ORDER BY v}: a full sort of {@code rows} {@code BIGINT}s (8 bytes each, plus DataFusion's
         * batch overhead); the digest depends on the order.
         */
        ORDER_BY(0),
        /**
         * {@code SELECT value % g AS k, count(*), sum(value) FROM generate_series(1, rows) GROUP BY 1}
         * with {@code g = max(1, rows / 3)}: groups of about 3 rows; the digest is order-insensitive.
         */
        GROUP_BY(1);

        private final int id;

        Query(int id) {
            this.id = id;
        }

        /** @return the number the native library knows the query by */
        public int id() {
            return id;
        }
    }

    private final String poolPath;
    private final int partitions;
    private final boolean answerSpillRequests;
    private final Object perCallConsumer;

    private DataFusionTask(NativeMemoryManager manager, long handle, String poolPath, int partitions,
            boolean answerSpillRequests, Object perCallConsumer) {
        super(manager, handle);
        this.poolPath = poolPath;
        this.partitions = partitions;
        this.answerSpillRequests = answerSpillRequests;
        this.perCallConsumer = perCallConsumer;
    }

    /**
     * Opens a task on nativemem's pool {@value #DEFAULT_POOL_PATH} of {@code manager} with
     * {@value #DEFAULT_PARTITIONS} partitions, answering spill requests.
     *
     * @param manager the manager DataFusion's memory is charged to (in Spark,
     *     {@code TaskNativeMemory.get()})
     * @return the open task; close it (in a Spark task it is also closed when the task ends)
     * @throws NullPointerException if {@code manager} is null
     * @throws IllegalStateException if the manager is closed
     * @throws UnsatisfiedLinkError if a native library cannot be loaded
     */
    public static DataFusionTask open(NativeMemoryManager manager) {
        return open(manager, DEFAULT_POOL_PATH, DEFAULT_PARTITIONS, true, null);
    }

    /**
     * Opens a task.
     *
     * @param manager the manager DataFusion's memory is charged to (in Spark,
     *     {@code TaskNativeMemory.get()}); in the per-call mode it is leased but not charged
     * @param poolPath the pool of {@code manager} DataFusion charges, e.g. {@code "datafusion"}
     * @param partitions DataFusion's target partitions, 1 to {@value #MAX_PARTITIONS}
     * @param answerSpillRequests if true, requests of the manager for memory make DataFusion's
     *     spillable consumers yield (refuse their next {@code try_grow}, so they spill); must be
     *     false with a {@code perCallConsumer}
     * @param perCallConsumer null for nativemem's pool; else the comparison mode: an object with
     *     public methods {@code long acquireMemory(long)} and {@code void freeMemory(long)} (a Spark
     *     {@code MemoryConsumer} of the task), called through JNI on every grow and shrink
     * @return the open task; close it (in a Spark task it is also closed when the task ends)
     * @throws NullPointerException if {@code manager} or {@code poolPath} is null
     * @throws IllegalArgumentException if {@code partitions} is out of range, {@code perCallConsumer} lacks the
     *     two methods, or both modes are asked for
     * @throws IllegalStateException if the manager is closed, or the Spark task completed
     * @throws UnsatisfiedLinkError if a native library cannot be loaded
     */
    public static DataFusionTask open(NativeMemoryManager manager, String poolPath, int partitions,
            boolean answerSpillRequests, Object perCallConsumer) {
        Objects.requireNonNull(manager, "manager");
        Objects.requireNonNull(poolPath, "poolPath");
        if (partitions < 1 || partitions > MAX_PARTITIONS) {
            throw new IllegalArgumentException("DataFusionTask: partitions must be in 1.." + MAX_PARTITIONS + ", got "
                    + partitions);
        }
        if (perCallConsumer != null) {
            if (answerSpillRequests) {
                throw new IllegalArgumentException("DataFusionTask: a perCallConsumer (the per-call mode) charges no"
                        + " nativemem pool, so it cannot answer spill requests: pass answerSpillRequests=false");
            }
            checkPerCallConsumer(perCallConsumer);
        }
        long managerHandle = manager.handle();
        LIBRARY.load();
        long handle = nativeOpen(NativeMemoryManager.nativeApi(), managerHandle, poolPath, partitions,
                answerSpillRequests, perCallConsumer);
        DataFusionTask task = new DataFusionTask(manager, handle, poolPath, partitions, answerSpillRequests,
                perCallConsumer);
        if (SPARK_PRESENT) {
            try {
                SparkTasks.closeAtTaskEnd(task);
            } catch (RuntimeException | Error e) {
                try {
                    task.close();
                } catch (RuntimeException suppressed) {
                    e.addSuppressed(suppressed);
                }
                throw e;
            }
        }
        return task;
    }

    /**
     * Starts {@code query} over {@code rows} generated rows on the engine's runtime and returns at
     * once; {@link #await()} waits for it. Each query gets a DataFusion pool of its own on the
     * manager's pool {@link #poolPath()} (its counters start at 0), holding a lease of the manager
     * until the query ended.
     *
     * @param query the query
     * @param rows rows of {@code generate_series(1, rows)}, {@code >= 1}
     * @throws NullPointerException if {@code query} is null
     * @throws IllegalArgumentException if {@code rows} is out of range
     * @throws IllegalStateException if a query is running, or the task or its manager is closed
     * @throws NativeOutOfMemoryException if the pool cannot be set up in the manager
     * @throws IllegalArgumentException if the manager refuses the pool path
     */
    public void start(Query query, long rows) {
        Objects.requireNonNull(query, "query");
        if (rows < 1) {
            throw new IllegalArgumentException("DataFusionTask: rows must be >= 1, got " + rows);
        }
        checkOpen();
        nativeStart(handle(), query.id(), rows);
    }

    /**
     * Waits until the query started last finished. Not interruptible: to stop a query early,
     * {@link #close()} the task from another thread.
     *
     * @return the query's statistics ({@link DataFusionStats#finished()} true)
     * @throws DataFusionQueryException if the query failed (the task stays usable)
     * @throws IllegalStateException if no query was started, or the task or its manager is closed
     */
    public DataFusionStats await() {
        checkOpen();
        return DataFusionStats.fromArray(nativeAwait(handle()));
    }

    /**
     * @return the statistics as of now: the pool's counters and the last query's figures
     *     ({@link DataFusionStats#finished()} false while it runs); callable from any thread
     * @throws IllegalStateException if the task or its manager is closed
     */
    public DataFusionStats stats() {
        checkOpen();
        return DataFusionStats.fromArray(nativeStats(handle()));
    }

    /**
     * Each DataFusion operator's peak memory in the running (or last) query, as nativemem's pool
     * saw it: what an engine publishes as an operator's "peak memory" SQL metric. Empty in the
     * per-call comparison mode.
     *
     * @return operator (DataFusion's consumer name, e.g. {@code ExternalSorter[0]}) to its peak
     *     bytes, largest first
     * @throws IllegalStateException if the task or its manager is closed
     */
    public java.util.Map<String, Long> operatorPeaks() {
        checkOpen();
        java.util.Map<String, Long> out = new java.util.LinkedHashMap<>();
        for (String line : nativeOperatorPeaks(handle()).split("\n")) {
            int tab = line.lastIndexOf('\t');
            if (tab > 0) {
                out.put(line.substring(0, tab), Long.parseLong(line.substring(tab + 1)));
            }
        }
        return out;
    }

    /** @return the pool path given at open */
    public String poolPath() {
        return poolPath;
    }

    /** @return DataFusion's target partitions given at open */
    public int partitions() {
        return partitions;
    }

    /** @return true if the pool answers the manager's requests for memory */
    public boolean answersSpillRequests() {
        return answerSpillRequests;
    }

    /** @return the per-call consumer (the comparison mode), or null on nativemem's pool */
    public Object perCallConsumer() {
        return perCallConsumer;
    }

    /**
     * Cancels a running query, waits for DataFusion to stop and releases all its memory
     * ({@link NativeObject#close()}: idempotent and thread-safe, the first call does the work).
     */
    @Override
    protected void closeNative() {
        nativeClose(handle());
    }

    /** The manager's close does not dispose of the engine's task: closing it is needed anyway. */
    @Override
    protected boolean closedWithManager() {
        return false;
    }

    @Override
    protected String describe() {
        return "DataFusionTask on '" + manager().name() + "'";
    }

    @Override
    protected IllegalStateException managerClosed() {
        return new IllegalStateException(describe() + " is closed: its NativeMemoryManager was closed");
    }

    @Override
    public String toString() {
        return "DataFusionTask{manager='" + manager().name() + "', pool='" + poolPath + "', partitions=" + partitions
                + (perCallConsumer != null ? ", per-call" : answerSpillRequests ? ", answers spill requests" : "")
                + ", handle=" + hexHandle() + (isClosed() ? ", closed" : "") + "}";
    }

    /** The native handle (package-private: for tests of handle misuse). */
    long nativeHandle() {
        return handle();
    }

    /** The per-call pool calls these two by name and signature through JNI: fail early here. */
    private static void checkPerCallConsumer(Object consumer) {
        try {
            Method acquire = consumer.getClass().getMethod("acquireMemory", long.class);
            Method free = consumer.getClass().getMethod("freeMemory", long.class);
            if (acquire.getReturnType() != long.class || free.getReturnType() != void.class
                    || Modifier.isStatic(acquire.getModifiers()) || Modifier.isStatic(free.getModifiers())) {
                throw new NoSuchMethodException("signatures");
            }
        } catch (NoSuchMethodException e) {
            throw new IllegalArgumentException("DataFusionTask: perCallConsumer " + consumer.getClass().getName()
                    + " must have public methods long acquireMemory(long) and void freeMemory(long)"
                    + " (an org.apache.spark.memory.MemoryConsumer)", e);
        }
    }

    private static boolean isPresent(String className) {
        try {
            Class.forName(className, false, DataFusionTask.class.getClassLoader());
            return true;
        } catch (ClassNotFoundException | LinkageError e) {
            return false;
        }
    }

    /** The only code that touches Spark; loaded only when Spark is on the class path. */
    private static final class SparkTasks {
        private SparkTasks() {
        }

        /** In a Spark task: closes {@code task} when the task ends (before the task's manager). */
        static void closeAtTaskEnd(final DataFusionTask task) {
            TaskContext ctx = TaskContext.get();
            if (ctx == null) {
                return;
            }
            ctx.addTaskCompletionListener(new TaskCompletionListener() {
                @Override
                public void onTaskCompletion(TaskContext context) {
                    task.close();
                }
            });
        }
    }

    // Native methods (libnativemem_df_engine), the task handle first. Package-private for tests;
    // not API. nativeOpen takes the engine ABI table's address and the manager's handle.

    static native long nativeOpen(long api, long manager, String poolPath, int partitions,
            boolean answerSpillRequests, Object perCallConsumer);

    static native void nativeStart(long handle, int query, long rows);

    static native long[] nativeAwait(long handle);

    static native long[] nativeStats(long handle);

    static native String nativeOperatorPeaks(long handle);

    static native void nativeClose(long handle);
}
