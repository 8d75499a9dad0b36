package org.nativemem;

/**
 * The executor's container governor: one per process, watching the memory of the container the
 * executor runs in and acting before the kernel kills it. The Spark plugin starts it at executor
 * start ({@code spark.nativemem.governor.enabled}, default {@code true}); embedders call
 * {@link #start}.
 *
 * <h2>What it reads</h2>
 * The limit is the one with the least headroom among the process's memory cgroup and its
 * ancestors (cgroup v2 {@code memory.max} and {@code memory.high}; v1
 * {@code memory.limit_in_bytes} and {@code hierarchical_memory_limit}) and the configured limit
 * ({@code spark.nativemem.containerLimit}); each compared with the anonymous memory of the cgroup
 * it is set on, never page cache. Without a cgroup the usage is the process's anonymous resident
 * memory. The files are read again on every sample, and the cgroup is found again when the
 * process moves (limits and membership can change at runtime): every second while usage is under
 * half the limit (or there is no limit yet), every 20 ms from the soft level up, sooner while
 * usage grows fast. Outside any memory cgroup and with no configured limit there is nothing to
 * govern, and {@link #start} says so.
 *
 * <h2>What it does</h2>
 * <ul>
 *   <li>Over the <b>soft level</b> (default {@value #DEFAULT_SOFT_LEVEL} of the limit): every task's
 *       manager hands its idle cushion back to Spark, the allocator returns free pages
 *       ({@code malloc_trim}), and native spillers spill, the largest task first, until usage is
 *       under the soft level again.
 *   <li>Over the <b>hard level</b> (default {@value #DEFAULT_HARD_LEVEL}): in addition, native grows
 *       that need new memory from Spark are refused, so operators spill or the task fails with a
 *       {@link NativeOutOfMemoryException} naming container pressure (Spark retries the task)
 *       instead of the kernel killing the executor with all its tasks. Memory a task already
 *       reserved still serves it; forced charges are never refused.
 * </ul>
 * A level is left 3% of the limit below it. Entering hard pressure logs the executor's native
 * usage (per task) with the container's figures; {@link #forensics()} returns the last snapshots.
 *
 * <p>Thread safety: all methods may be called from any thread.
 */
public final class ContainerGovernor {
    /** Default soft level, a fraction of the container limit. */
    public static final double DEFAULT_SOFT_LEVEL = 0.85;
    /** Default hard level, a fraction of the container limit. */
    public static final double DEFAULT_HARD_LEVEL = 0.93;
    /** Shortest sampling interval (at and above the soft level), milliseconds. */
    public static final long MIN_INTERVAL_MILLIS = 20;
    /** Longest sampling interval (under half the limit), milliseconds. */
    public static final long MAX_INTERVAL_MILLIS = 1000;

    private ContainerGovernor() {
    }

    /**
     * Starts the governor unless one runs, or there is neither a memory cgroup nor a configured
     * limit (loads the native library first).
     *
     * @param configuredLimitBytes a limit to apply beside the cgroup's; 0 for none
     * @param softLevel soft level, a fraction of the limit in (0, 1]
     * @param hardLevel hard level, a fraction in [softLevel, 1]
     * @return what it found, one line for the log: the limit that binds and where it comes from,
     *     usage and page cache; or why there is no governor
     * @throws IllegalArgumentException for levels out of order or a negative limit
     * @throws NativeMemoryException if the container's files cannot be read
     */
    public static String start(long configuredLimitBytes, double softLevel, double hardLevel) {
        NativeLibraryLoader.load();
        return nativeStart(configuredLimitBytes, softLevel, hardLevel, MIN_INTERVAL_MILLIS, MAX_INTERVAL_MILLIS);
    }

    /** Stops the governor (nothing happens without one); grows are no longer refused afterwards. */
    public static void stop() {
        NativeLibraryLoader.load();
        nativeStop();
    }

    /** @return the governor's state now (all zero and not running without one) */
    public static Status status() {
        NativeLibraryLoader.load();
        return new Status(nativeStatus());
    }

    /**
     * @return the last snapshots of the executor's native usage with the container's figures, one
     *     taken now, oldest first; null without a governor
     */
    public static String forensics() {
        NativeLibraryLoader.load();
        return nativeForensics();
    }

    /** The governor's state: the last sample and what it did. Immutable. */
    public static final class Status {
        private final long[] v;

        Status(long[] values) {
            this.v = values.clone();
        }

        /** @return whether a governor runs */
        public boolean running() {
            return v[0] != 0;
        }

        /** @return the limit that binds, bytes (0: none or not running) */
        public long limitBytes() {
            return v[1];
        }

        /** @return anonymous memory charged against that limit at the last sample, bytes */
        public long anonymousBytes() {
            return v[2];
        }

        /** @return bytes left under the limit (0 without a limit) */
        public long headroomBytes() {
            return Math.max(0, v[1] - v[2]);
        }

        /** @return 0: no pressure, 1: soft, 2: hard */
        public int pressure() {
            return (int) v[3];
        }

        /** @return samples taken */
        public long samples() {
            return v[4];
        }

        /** @return time spent reading the container's files, nanoseconds, all samples */
        public long sampleNanos() {
            return v[5];
        }

        /** @return samples that failed to read */
        public long sampleErrors() {
            return v[6];
        }

        /** @return times usage rose over the soft level */
        public long softEntries() {
            return v[7];
        }

        /** @return times usage rose over the hard level */
        public long hardEntries() {
            return v[8];
        }

        /** @return idle-memory give-backs asked of every task, and the bytes they handed back to Spark */
        public long giveBacks() {
            return v[9];
        }

        /** @return bytes the give-backs handed back to Spark */
        public long giveBackBytes() {
            return v[10];
        }

        /** @return allocator trims */
        public long trims() {
            return v[11];
        }

        /** @return spill rounds asked of the tasks' native spillers */
        public long spills() {
            return v[12];
        }

        /** @return bytes those spills freed and handed back */
        public long spilledBytes() {
            return v[13];
        }

        /** @return time from crossing the soft level to usage back under it, last episode, ns */
        public long lastReliefNanos() {
            return v[14];
        }

        /** @return the longest such episode, ns */
        public long maxReliefNanos() {
            return v[15];
        }

        /** @return native grows refused for container pressure so far (each then spilled or failed) */
        public long refusedGrows() {
            return v[16];
        }

        @Override
        public String toString() {
            return "ContainerGovernor.Status{running=" + running() + ", limit=" + Bytes.human(limitBytes())
                    + ", anonymous=" + Bytes.human(anonymousBytes()) + ", pressure=" + pressure() + ", samples="
                    + samples() + ", softEntries=" + softEntries() + ", hardEntries=" + hardEntries()
                    + ", giveBackBytes=" + Bytes.human(giveBackBytes()) + ", spills=" + spills() + ", spilled="
                    + Bytes.human(spilledBytes()) + ", refusedGrows=" + refusedGrows() + "}";
        }
    }

    private static native String nativeStart(long configuredLimitBytes, double softLevel, double hardLevel,
            long minIntervalMillis, long maxIntervalMillis);

    private static native long[] nativeStatus();

    private static native String nativeForensics();

    private static native void nativeStop();
}
