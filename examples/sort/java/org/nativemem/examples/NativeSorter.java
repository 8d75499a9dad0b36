package org.nativemem.examples;

import java.io.File;
import java.util.Arrays;
import java.util.Iterator;
import java.util.NoSuchElementException;
import java.util.Objects;
import java.util.concurrent.atomic.AtomicBoolean;

import org.nativemem.NativeMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeObject;
import org.nativemem.NativeOutOfMemoryException;

/**
 * A spilling external sort of {@code long} keys, running natively under a task's
 * {@link NativeMemoryManager}: the example of a native operator living under nativemem.
 *
 * <pre>{@code
 * NativeMemoryManager mm = TaskNativeMemory.get();            // in a Spark task
 * try (NativeSorter sorter = new NativeSorter(mm, "sort", spillDir)) {
 *     for (long[] batch : input) {
 *         sorter.insert(batch);                               // spills when memory runs short
 *     }
 *     Iterator<long[]> out = sorter.sorted();                 // ascending, in batches
 *     while (out.hasNext()) {
 *         consume(out.next());
 *     }
 * }                                                           // memory freed, spill files deleted
 * }</pre>
 *
 * <h2>Where it runs</h2>
 * The sort is an engine in its own native library, {@code libnativemem_examples} (shipped in
 * {@code nativemem-examples.jar}, loaded on first use after nativemem's own library; override:
 * {@code -Dnativemem.examples.library.path=<file>}). It reaches the manager only through the
 * engine ABI: this class passes it {@link NativeMemoryManager#nativeApi()} and
 * {@link NativeMemoryManager#handle()}, and every native call leases the manager for its span.
 *
 * <h2>Memory</h2>
 * The keys are buffered in native memory allocated in chunks (1 MiB by default) from the pool
 * {@link SorterOptions#poolPath()} of the manager, so the manager counts it, limits it (pool limit,
 * task limit, and in Spark the task's execution memory) and can ask for it back. When a chunk is
 * refused, or when the manager asks (in Spark: because another consumer of the task needs
 * memory), the sorter writes its buffer to a file under {@code spillDir} as one sorted run and
 * frees it. {@link #sorted()} merges the buffer and the runs; run files are deleted as the merge
 * finishes with them, and whatever is left when the sorter is closed.
 *
 * <h2>Contract</h2>
 * <ul>
 *   <li>Input phase: {@link #insert(long[])}. Output phase, after {@link #sorted()} or the first
 *       {@link #nextBatch(long[])}: the keys of every insert, ascending (signed order), each batch
 *       continuing where the last one ended. An insert after the input ended throws
 *       {@link IllegalStateException}.
 *   <li>{@link #close()} frees everything and deletes the spill files; it is idempotent and may be
 *       called from any thread. Closing the sorter's manager closes the sorter too (its memory is
 *       then released first, so the manager reports no leak). After either, every method but
 *       {@code close}, {@link #isClosed()} and the getters throws {@link IllegalStateException}.
 *   <li>Threads: one call at a time. A call made while another thread's call on the same sorter
 *       runs throws {@link IllegalStateException} instead of waiting; {@link #stats()} and
 *       {@link #close()} never do (stats then reports the state as of the last finished call;
 *       close lets the running call finish and the sorter is freed when it returns). The
 *       sorter may be spilled at any time by another thread (Spark) without any call of yours.
 *   <li>Errors: {@link NativeOutOfMemoryException} (its message is the manager's usage report)
 *       when even an empty buffer cannot get one chunk, or the merge cannot get its read buffers;
 *       {@link NativeMemoryException} when a spill file cannot be written or read, or a Java
 *       listener threw (its exception is in the message, not the cause: it crosses the engine
 *       ABI as text). After an error during insert a prefix of the batch may have been buffered
 *       ({@link SorterStats#rowsInserted()} counts it).
 * </ul>
 * Not charged to the pool: a 512 KiB insert scratch, the spill write buffer and the output
 * batch being copied to Java.
 */
public final class NativeSorter extends NativeObject {
    private final String name;
    private final File spillDir;
    private final SorterOptions options;
    private final AtomicBoolean sortedCalled = new AtomicBoolean();

    /**
     * Creates a sorter with the {@linkplain SorterOptions#defaults() default options}.
     *
     * @param manager the manager whose pool {@code sort} the sorter's memory is charged to (in
     *     Spark, {@code TaskNativeMemory.get()})
     * @param name name of the sorter in reports, errors and spill file names
     * @param spillDir directory for the spill files (created if missing; in Spark one of the
     *     executor's local dirs)
     * @throws NullPointerException if an argument is null
     * @throws IllegalStateException if the manager is closed
     * @throws NativeMemoryException if the spill directory cannot be created
     */
    public NativeSorter(NativeMemoryManager manager, String name, File spillDir) {
        this(manager, name, spillDir, SorterOptions.defaults());
    }

    /**
     * Creates a sorter.
     *
     * @param manager the manager whose pool {@link SorterOptions#poolPath()} the sorter's memory
     *     is charged to
     * @param name name of the sorter in reports, errors and spill file names
     * @param spillDir directory for the spill files (created if missing)
     * @param options pool, limits and buffer sizes
     * @throws NullPointerException if an argument is null
     * @throws IllegalStateException if the manager is closed
     * @throws IllegalArgumentException if the options do not fit together (a buffer cap below the
     *     chunk size, a pool that exists with another limit)
     * @throws NativeMemoryException if the spill directory cannot be created
     * @throws UnsatisfiedLinkError if a native library cannot be loaded
     */
    public NativeSorter(NativeMemoryManager manager, String name, File spillDir, SorterOptions options) {
        super(manager, create(manager, name, spillDir, options));
        this.name = name;
        this.spillDir = spillDir;
        this.options = options;
    }

    /** Checks the arguments and creates the native sorter; its handle. */
    private static long create(NativeMemoryManager manager, String name, File spillDir, SorterOptions options) {
        Objects.requireNonNull(manager, "manager");
        Objects.requireNonNull(name, "name");
        Objects.requireNonNull(spillDir, "spillDir");
        Objects.requireNonNull(options, "options");
        long managerHandle = manager.handle();
        ExamplesLibraryLoader.load();
        return nativeCreate(NativeMemoryManager.nativeApi(), managerHandle, name, spillDir.getPath(),
                options.poolPath(), options.poolLimitOrMinusOne(), options.chunkBytes(), options.batchKeys(),
                options.maxBufferOrMinusOne(), options.readBufferBytes(), options.writeBufferBytes());
    }

    /**
     * Adds every key of {@code batch}.
     *
     * @param batch keys; copied, the array may be reused once this returns
     * @throws NullPointerException if {@code batch} is null
     * @throws NativeOutOfMemoryException if not even one chunk can be had after spilling
     * @throws NativeMemoryException if a spill failed (disk full, ...)
     * @throws IllegalStateException if the sorter or its manager is closed, the input has ended,
     *     or another thread's call is running
     */
    public void insert(long[] batch) {
        Objects.requireNonNull(batch, "batch");
        insert(batch, 0, batch.length);
    }

    /**
     * Adds {@code batch[off]} to {@code batch[off + len - 1]}.
     *
     * @param batch keys; copied, the array may be reused once this returns
     * @param off first index
     * @param len number of keys
     * @throws NullPointerException if {@code batch} is null
     * @throws IndexOutOfBoundsException if the range is not within {@code batch}
     * @throws NativeOutOfMemoryException if not even one chunk can be had after spilling
     * @throws NativeMemoryException if a spill failed
     * @throws IllegalStateException if the sorter or its manager is closed, the input has ended,
     *     or another thread's call is running
     */
    public void insert(long[] batch, int off, int len) {
        Objects.requireNonNull(batch, "batch");
        if (off < 0 || len < 0 || off > batch.length - len) {
            throw new IndexOutOfBoundsException("range [" + off + ", " + off + " + " + len
                    + ") out of bounds for length " + batch.length);
        }
        checkOpen();
        nativeInsert(handle(), batch, off, len);
    }

    /**
     * Ends the input and returns the keys in ascending order, in batches of up to
     * {@link SorterOptions#batchKeys()} keys (every batch full but the last). Each {@code next()}
     * returns a new array the caller owns. Can be called once; the iterator shares its position
     * with {@link #nextBatch(long[])}.
     *
     * <p>The merge is prepared here: it needs a read buffer per spilled run from the pool and,
     * if they do not fit, spills the in-memory keys first and shrinks the buffers (down to 8 KiB
     * per run). The iterator's {@code hasNext()} and {@code next()} throw the exceptions of
     * {@link #nextBatch(long[])}.
     *
     * @return the sorted batches
     * @throws NativeOutOfMemoryException if the merge cannot get its read buffers
     * @throws NativeMemoryException if a spill file cannot be read
     * @throws IllegalStateException if called twice, or the sorter or its manager is closed
     */
    public Iterator<long[]> sorted() {
        checkOpen();
        if (!sortedCalled.compareAndSet(false, true)) {
            throw new IllegalStateException("NativeSorter '" + name + "': sorted() was already called");
        }
        nativeFinish(handle());
        return new Batches();
    }

    /**
     * Copies the next keys in ascending order into {@code out}, from index 0. Ends the input on
     * the first call (like {@link #sorted()}, whose iterator shares the position).
     *
     * @param out where to put the keys
     * @return the number of keys copied: {@code out.length} unless the output ended, 0 once every
     *     key was returned
     * @throws NullPointerException if {@code out} is null
     * @throws NativeOutOfMemoryException if the merge cannot get its read buffers (first call)
     * @throws NativeMemoryException if a spill file cannot be read or is corrupt
     * @throws IllegalStateException if the sorter or its manager is closed, or another thread's
     *     call is running
     */
    public int nextBatch(long[] out) {
        Objects.requireNonNull(out, "out");
        checkOpen();
        return nativeNextBatch(handle(), out);
    }

    /**
     * @return a snapshot of the sorter's statistics (rows, spills, memory); during another
     *     thread's call, as of the last call that finished
     * @throws IllegalStateException if the sorter or its manager is closed
     */
    public SorterStats stats() {
        checkOpen();
        return SorterStats.fromArray(nativeStats(handle()));
    }

    /** @return the name given at creation */
    public String name() {
        return name;
    }

    /** @return the spill directory given at creation */
    public File spillDir() {
        return spillDir;
    }

    /** @return the options given at creation */
    public SorterOptions options() {
        return options;
    }

    /**
     * Frees the sorter's memory and deletes its spill files ({@link NativeObject#close()}:
     * idempotent and thread-safe; a no-op once the manager is closed, which closed the sorter). If
     * another thread's call is running, that call finishes and the sorter is freed when it returns.
     */
    @Override
    protected void closeNative() {
        nativeClose(handle());
    }

    @Override
    protected String describe() {
        return "NativeSorter '" + name + "'";
    }

    /**
     * Sorters open in this process (diagnostics and leak checks: 0 once every sorter and every
     * manager with sorters is closed).
     *
     * @return the number of live native sorters
     * @throws UnsatisfiedLinkError if a native library cannot be loaded
     */
    public static long liveSorters() {
        ExamplesLibraryLoader.load();
        return nativeLiveSorters();
    }

    @Override
    public String toString() {
        return "NativeSorter{name='" + name + "', manager='" + manager().name() + "', handle=" + hexHandle()
                + (isClosed() ? ", closed" : "") + "}";
    }

    /** The native handle (package-private: for tests of handle misuse). */
    long nativeHandle() {
        return handle();
    }

    /** The iterator of {@link #sorted()}: reads one batch ahead. */
    private final class Batches implements Iterator<long[]> {
        private long[] next;
        private boolean ended;

        @Override
        public boolean hasNext() {
            if (next == null && !ended) {
                long[] buf = new long[options.batchKeys()];
                int n = nextBatch(buf);
                if (n == 0) {
                    ended = true;
                } else {
                    next = n == buf.length ? buf : Arrays.copyOf(buf, n);
                }
            }
            return next != null;
        }

        @Override
        public long[] next() {
            if (!hasNext()) {
                throw new NoSuchElementException("NativeSorter '" + name + "': no more keys");
            }
            long[] batch = next;
            next = null;
            return batch;
        }
    }

    // Native methods (libnativemem_examples), the sorter handle first. Package-private for tests;
    // not API. nativeCreate takes the engine ABI table's address and the manager's handle.

    static native long nativeCreate(long api, long manager, String name, String spillDir, String poolPath,
            long poolLimitBytes, long chunkBytes, long batchKeys, long maxBufferBytes, long readBufferBytes,
            long writeBufferBytes);

    static native void nativeInsert(long handle, long[] keys, int off, int len);

    static native void nativeFinish(long handle);

    static native int nativeNextBatch(long handle, long[] out);

    static native long[] nativeStats(long handle);

    static native void nativeClose(long handle);

    static native long nativeLiveSorters();
}
