package org.nativemem.examples;

import java.util.Objects;
import java.util.OptionalLong;

/**
 * Immutable options of a {@link NativeSorter}. Start from {@link #defaults()} and derive copies:
 *
 * <pre>{@code
 * SorterOptions options = SorterOptions.defaults()
 *     .withPoolPath("sort/orders")       // charge the buffer to this pool of the task's manager
 *     .withPoolLimit(256L << 20)         // and never buffer more than 256 MiB in it
 *     .withBatchKeys(16 << 10);          // sorted() yields batches of 16 Ki keys
 * }</pre>
 *
 * Every {@code with...} method validates its argument and throws {@link IllegalArgumentException}
 * for a value the native sorter would refuse. All sizes are in bytes unless named {@code Keys}.
 * Instances are immutable and thread-safe.
 */
public final class SorterOptions {
    /** Default pool path: {@code sort}, directly below the task's root pool. */
    public static final String DEFAULT_POOL_PATH = "sort";
    /** Default buffer chunk: 1 MiB (131,072 keys), one pool allocation each. */
    public static final long DEFAULT_CHUNK_BYTES = 1L << 20;
    /** Default output batch: 64 Ki keys (512 KiB). */
    public static final int DEFAULT_BATCH_KEYS = 64 << 10;
    /** Default merge read buffer per spilled run: 256 KiB (shrunk to fit the pool if needed). */
    public static final long DEFAULT_READ_BUFFER_BYTES = 256L << 10;
    /** Default write buffer of a spill: 1 MiB. */
    public static final long DEFAULT_WRITE_BUFFER_BYTES = 1L << 20;

    private static final long NONE = -1L;
    private static final SorterOptions DEFAULTS = new SorterOptions(DEFAULT_POOL_PATH, NONE, DEFAULT_CHUNK_BYTES,
            DEFAULT_BATCH_KEYS, NONE, DEFAULT_READ_BUFFER_BYTES, DEFAULT_WRITE_BUFFER_BYTES);

    private final String poolPath;
    private final long poolLimitBytes;
    private final long chunkBytes;
    private final int batchKeys;
    private final long maxBufferBytes;
    private final long readBufferBytes;
    private final long writeBufferBytes;

    private SorterOptions(String poolPath, long poolLimitBytes, long chunkBytes, int batchKeys, long maxBufferBytes,
            long readBufferBytes, long writeBufferBytes) {
        this.poolPath = poolPath;
        this.poolLimitBytes = poolLimitBytes;
        this.chunkBytes = chunkBytes;
        this.batchKeys = batchKeys;
        this.maxBufferBytes = maxBufferBytes;
        this.readBufferBytes = readBufferBytes;
        this.writeBufferBytes = writeBufferBytes;
    }

    /** @return pool {@code sort}, no pool limit, 1 MiB chunks, 64 Ki-key batches, no buffer cap */
    public static SorterOptions defaults() {
        return DEFAULTS;
    }

    /**
     * Sets the pool of the manager the sorter's memory is charged to (created if missing). Sorters
     * of one task may share a pool; its limit then bounds them together.
     *
     * @param path pool path below the root, e.g. {@code "sort"} or {@code "query-3/sort"}
     * @return a copy with the pool path set
     * @throws NullPointerException if {@code path} is null
     * @throws IllegalArgumentException if {@code path} is empty or has an empty element
     */
    public SorterOptions withPoolPath(String path) {
        Objects.requireNonNull(path, "path");
        if (path.isEmpty() || path.startsWith("/") || path.endsWith("/") || path.contains("//")) {
            throw new IllegalArgumentException("pool path must be non-empty without empty elements, got '" + path
                    + "'");
        }
        return new SorterOptions(path, poolLimitBytes, chunkBytes, batchKeys, maxBufferBytes, readBufferBytes,
                writeBufferBytes);
    }

    /**
     * Gives the sorter's pool a limit. The limit is set when the pool is created; a sorter asking
     * for an existing pool with a different limit fails at creation. The sorter spills when its
     * buffer reaches the limit (less the merge read buffers it needs at the end).
     *
     * @param bytes the limit, {@code >= 0}
     * @return a copy with the pool limit set
     * @throws IllegalArgumentException if {@code bytes} is negative
     */
    public SorterOptions withPoolLimit(long bytes) {
        requireNonNegative("pool limit", bytes);
        return new SorterOptions(poolPath, bytes, chunkBytes, batchKeys, maxBufferBytes, readBufferBytes,
                writeBufferBytes);
    }

    /** @return a copy without a pool limit (only the task's limit and Spark's budget apply) */
    public SorterOptions withoutPoolLimit() {
        return new SorterOptions(poolPath, NONE, chunkBytes, batchKeys, maxBufferBytes, readBufferBytes,
                writeBufferBytes);
    }

    /**
     * @param bytes size of one buffer chunk: a positive multiple of 8
     * @return a copy with the chunk size set
     * @throws IllegalArgumentException if {@code bytes} is not a positive multiple of 8
     */
    public SorterOptions withChunkBytes(long bytes) {
        if (bytes <= 0 || bytes % 8 != 0) {
            throw new IllegalArgumentException("chunk size must be a positive multiple of 8 bytes, got " + bytes);
        }
        return new SorterOptions(poolPath, poolLimitBytes, bytes, batchKeys, maxBufferBytes, readBufferBytes,
                writeBufferBytes);
    }

    /**
     * @param keys most keys per batch of {@link NativeSorter#sorted()}, {@code > 0}
     * @return a copy with the batch size set
     * @throws IllegalArgumentException if {@code keys <= 0}
     */
    public SorterOptions withBatchKeys(int keys) {
        if (keys <= 0) {
            throw new IllegalArgumentException("batch size must be > 0 keys, got " + keys);
        }
        return new SorterOptions(poolPath, poolLimitBytes, chunkBytes, keys, maxBufferBytes, readBufferBytes,
                writeBufferBytes);
    }

    /**
     * Caps the in-memory buffer whatever the pool allows: the sorter spills before its buffer
     * would exceed {@code bytes}.
     *
     * @param bytes the cap, at least the chunk size (checked when the sorter is created)
     * @return a copy with the cap set
     * @throws IllegalArgumentException if {@code bytes} is negative
     */
    public SorterOptions withMaxBufferBytes(long bytes) {
        requireNonNegative("max buffer", bytes);
        return new SorterOptions(poolPath, poolLimitBytes, chunkBytes, batchKeys, bytes, readBufferBytes,
                writeBufferBytes);
    }

    /**
     * @param bytes most read buffer per spilled run during the merge, {@code >= 8}
     * @return a copy with the read buffer size set
     * @throws IllegalArgumentException if {@code bytes < 8}
     */
    public SorterOptions withReadBufferBytes(long bytes) {
        if (bytes < 8) {
            throw new IllegalArgumentException("read buffer must be >= 8 bytes, got " + bytes);
        }
        return new SorterOptions(poolPath, poolLimitBytes, chunkBytes, batchKeys, maxBufferBytes, bytes,
                writeBufferBytes);
    }

    /**
     * @param bytes write buffer of a spill, {@code >= 8}
     * @return a copy with the write buffer size set
     * @throws IllegalArgumentException if {@code bytes < 8}
     */
    public SorterOptions withWriteBufferBytes(long bytes) {
        if (bytes < 8) {
            throw new IllegalArgumentException("write buffer must be >= 8 bytes, got " + bytes);
        }
        return new SorterOptions(poolPath, poolLimitBytes, chunkBytes, batchKeys, maxBufferBytes, readBufferBytes,
                bytes);
    }

    /** @return the pool path */
    public String poolPath() {
        return poolPath;
    }

    /** @return the pool limit in bytes, or empty for none */
    public OptionalLong poolLimit() {
        return poolLimitBytes < 0 ? OptionalLong.empty() : OptionalLong.of(poolLimitBytes);
    }

    /** @return the chunk size in bytes */
    public long chunkBytes() {
        return chunkBytes;
    }

    /** @return the most keys per output batch */
    public int batchKeys() {
        return batchKeys;
    }

    /** @return the buffer cap in bytes, or empty for none */
    public OptionalLong maxBufferBytes() {
        return maxBufferBytes < 0 ? OptionalLong.empty() : OptionalLong.of(maxBufferBytes);
    }

    /** @return the most read buffer per run during the merge, in bytes */
    public long readBufferBytes() {
        return readBufferBytes;
    }

    /** @return the write buffer of a spill, in bytes */
    public long writeBufferBytes() {
        return writeBufferBytes;
    }

    long poolLimitOrMinusOne() {
        return poolLimitBytes;
    }

    long maxBufferOrMinusOne() {
        return maxBufferBytes;
    }

    private static void requireNonNegative(String what, long bytes) {
        if (bytes < 0) {
            throw new IllegalArgumentException(what + " must be >= 0 bytes, got " + bytes);
        }
    }

    @Override
    public String toString() {
        return "SorterOptions{pool='" + poolPath + "', poolLimit=" + (poolLimitBytes < 0 ? "none" : poolLimitBytes)
                + ", chunkBytes=" + chunkBytes + ", batchKeys=" + batchKeys + ", maxBufferBytes="
                + (maxBufferBytes < 0 ? "none" : maxBufferBytes) + ", readBufferBytes=" + readBufferBytes
                + ", writeBufferBytes=" + writeBufferBytes + "}";
    }
}
