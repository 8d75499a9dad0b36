package org.nativemem.examples;

import java.io.File;
import java.io.IOException;
import java.io.Serializable;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.SplittableRandom;
import java.util.TreeMap;
import java.util.concurrent.Callable;
import java.util.concurrent.ConcurrentHashMap;
import java.util.function.Supplier;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import org.apache.spark.SparkConf;
import org.apache.spark.SparkEnv;
import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaRDD;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.executor.TaskMetrics;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.scheduler.SparkListener;
import org.apache.spark.scheduler.SparkListenerStageSubmitted;
import org.apache.spark.scheduler.SparkListenerTaskEnd;
import org.apache.spark.sql.SparkSession;
import org.apache.spark.unsafe.Platform;
import org.apache.spark.util.collection.unsafe.sort.PrefixComparators;
import org.apache.spark.util.collection.unsafe.sort.RecordComparator;
import org.apache.spark.util.collection.unsafe.sort.UnsafeExternalSorter;
import org.apache.spark.util.collection.unsafe.sort.UnsafeSorterIterator;
import org.nativemem.Bytes;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.spark.ExecutorNativeMemoryStats;
import org.nativemem.spark.NativeMemoryPlugin;
import org.nativemem.spark.NativeMemorySparkConf;
import org.nativemem.spark.NativeTaskMetrics;
import org.nativemem.spark.SparkApiCheck;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskNativeMemory;

/**
 * The main example: every Spark task sorts its partition of random {@code long}s with a
 * {@link NativeSorter} under the task's native memory manager ({@link TaskNativeMemory#get()}),
 * with Spark memory small enough that the sorts spill, and checks its output.
 *
 * <pre>
 *   scripts/run-example.sh [--rows N] [--partitions P] [--with-jvm-sort] [--require-spill] [--seed S]
 * </pre>
 *
 * <h2>What each task does</h2>
 * Generates its share of the rows (a seeded {@link SplittableRandom} per partition) in batches of
 * 64 Ki keys, inserts them into a {@code NativeSorter} spilling under Spark's local dirs, then
 * reads the sorted output and checks it: ascending, as many rows as inserted, and the same
 * order-independent checksums (wrapping sum of the keys and of a 64-bit mix of each) as the
 * input. It reports rows, the sorter's native peak, bytes spilled, runs and its times.
 *
 * <p>With {@code --with-jvm-sort} the same task also sorts the same keys with Spark's own
 * {@link UnsafeExternalSorter} (the spilling sorter behind Spark SQL's sort), a
 * {@code MemoryConsumer} of the same {@code TaskMemoryManager}: both compete for the task's
 * execution memory, and memory needed by one makes Spark spill the other.
 * <ul>
 *   <li>Spark → native: while both take input (batch by batch in turn), the JVM sorter's pages
 *       make Spark ask the native manager for memory back: its unused cushion, then a native spill.
 *   <li>native → Spark: Spark's sorters spill for other consumers only once their output is being
 *       read (while taking input they spill only for themselves), so the native sorter gets half of
 *       the keys while both take input and the other half after the JVM sorter's output started;
 *       its memory needs then make Spark spill the JVM sorter.
 * </ul>
 * Each spill is attributed by which sorter was running when it happened (the task is
 * single-threaded). Both outputs are read in lockstep and must be equal key for key. Spark's own
 * spill metric of the task ({@code memoryBytesSpilled}, seen by a {@link SparkListener}) is printed
 * next to the JVM sorter's count and must agree.
 *
 * <h2>Driver</h2>
 * Prints one line per task, totals, and then what the executors report after the job through the
 * plugin's read-out ({@link TaskNativeMemory#executorStats()}) plus {@link NativeSorter#liveSorters()}
 * and the spill files left under the local dirs, taken in a follow-up job on every executor:
 * {@code leaked: 0 B} is their sum (native bytes used or reserved, bytes a task left to its
 * manager's close, bytes not returned to Spark). The job throws, so spark-submit exits non-zero,
 * if any check fails: sortedness, counts, checksums, a leak, a live manager, sorter or spill
 * file, a failed close, and with {@code --require-spill}: spills in every task (and, with the JVM
 * sorter, spills in both directions).
 *
 * <h2>Settings</h2>
 * Unless given with {@code --conf}, the job sets: the plugin, off-heap execution memory
 * ({@value #DEFAULT_OFF_HEAP_SIZE}: native and JVM sorters share Spark's OFF_HEAP pool, so with two
 * tasks running each gets at most half) and {@code spark.nativemem.reservationBlockSize=}
 * {@value #DEFAULT_BLOCK}. Spark's leak check ({@code spark.unsafe.exceptionOnMemoryLeak}) is on
 * when run through {@code scripts/spark-submit.sh}.
 */
public final class SortJob {
    static final String DEFAULT_OFF_HEAP_SIZE = "32m";
    static final String DEFAULT_BLOCK = "4m";
    static final long DEFAULT_ROWS = 50_000_000L;
    static final int DEFAULT_PARTITIONS = 8;
    static final int BATCH_KEYS = 64 << 10;
    static final String SPILL_SUBDIR = "nativemem-sort";
    static final String SPILL_FILE_PREFIX = "nativemem-sort-";

    private SortJob() {
    }

    /** Command-line options. */
    static final class Args implements Serializable {
        private static final long serialVersionUID = 1L;
        long rows = DEFAULT_ROWS;
        int partitions = DEFAULT_PARTITIONS;
        boolean withJvmSort;
        boolean requireSpill;
        long seed = 42;

        static Args parse(String[] argv) {
            Args a = new Args();
            for (int i = 0; i < argv.length; i++) {
                String arg = argv[i];
                switch (arg) {
                    case "--rows":
                        a.rows = parseCount(value(argv, ++i, arg));
                        break;
                    case "--partitions":
                        a.partitions = Math.toIntExact(parseCount(value(argv, ++i, arg)));
                        break;
                    case "--seed":
                        a.seed = Long.parseLong(value(argv, ++i, arg));
                        break;
                    case "--with-jvm-sort":
                        a.withJvmSort = true;
                        break;
                    case "--require-spill":
                        a.requireSpill = true;
                        break;
                    case "-h":
                    case "--help":
                        System.out.println("usage: SortJob [--rows N (default 50m)] [--partitions P (default 8)]"
                                + " [--with-jvm-sort] [--require-spill] [--seed S]");
                        System.exit(0);
                        break;
                    default:
                        throw new IllegalArgumentException("SortJob: unknown argument '" + arg + "' (see --help)");
                }
            }
            if (a.rows < 0 || a.partitions <= 0) {
                throw new IllegalArgumentException("SortJob: --rows must be >= 0 and --partitions > 0");
            }
            return a;
        }

        private static String value(String[] argv, int i, String flag) {
            if (i >= argv.length) {
                throw new IllegalArgumentException("SortJob: " + flag + " needs a value");
            }
            return argv[i];
        }

        /** {@code 2000000}, {@code 2_000_000}, {@code 2m}, {@code 50M}, {@code 10k}, {@code 1b}. */
        static long parseCount(String s) {
            String v = s.trim().toLowerCase(Locale.ROOT).replace("_", "");
            long mult = 1;
            if (v.endsWith("k")) {
                mult = 1_000;
            } else if (v.endsWith("m")) {
                mult = 1_000_000;
            } else if (v.endsWith("b")) {
                mult = 1_000_000_000;
            }
            if (mult != 1) {
                v = v.substring(0, v.length() - 1);
            }
            return Math.multiplyExact(Long.parseLong(v), mult);
        }
    }

    // ---- what a task reports -------------------------------------------------------------------

    /** One task's result, returned to the driver. */
    static final class TaskResult implements Serializable {
        private static final long serialVersionUID = 1L;
        int partition;
        String executorId;
        long taskAttemptId;
        long rows;
        SorterStats nativeStats;
        /** What Spark asked the task's native manager to give back: requests, bytes released. */
        long sparkSpillRequests;
        long sparkSpillReleased;
        /** Native bytes spilled while the JVM sorter ran (Spark asked for them). */
        long nativeSpilledForSpark;
        long nativeRunsForSpark;
        /** JVM sorter (0 without it). */
        long jvmPeak;
        long jvmSpilled;
        /** JVM bytes spilled while the native sorter ran (native memory needs made Spark spill it). */
        long jvmSpilledForNative;
        /** JVM bytes the task made its JVM sorter spill (input phase) so the native sorter could go on. */
        long jvmSpilledByTask;
        long insertNanos;
        long outputNanos;
        long totalNanos;
    }

    /** Order-independent checksums of a multiset of keys. */
    static final class Checksum {
        long count;
        long sum;
        long mixed;

        void add(long key) {
            count++;
            sum += key;
            mixed += mix(key);
        }

        static long mix(long z) {
            z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9L;
            z = (z ^ (z >>> 27)) * 0x94D049BB133111EBL;
            return z ^ (z >>> 31);
        }

        boolean sameAs(Checksum o) {
            return count == o.count && sum == o.sum && mixed == o.mixed;
        }

        @Override
        public String toString() {
            return String.format(Locale.ROOT, "%d keys, sum %016x, mix %016x", count, sum, mixed);
        }
    }

    /** Orders 8-byte records as signed longs (ties of the prefix only; the prefix is the key). */
    static final class LongRecordComparator extends RecordComparator {
        static final LongRecordComparator INSTANCE = new LongRecordComparator();

        @Override
        public int compare(Object l, long lo, int ll, Object r, long ro, int rl) {
            return Long.compare(Platform.getLong(l, lo), Platform.getLong(r, ro));
        }
    }

    /** Adds {@code what} to {@code failed} unless {@code ok}. */
    static void expect(List<String> failed, boolean ok, String what) {
        if (!ok) {
            failed.add(what);
        }
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError("SortJob check failed: " + what);
        }
    }

    /** The task's spill directory: under one of this executor's Spark local dirs. */
    static File spillDir(int partition) {
        File[] local = SparkEnv.get().blockManager().diskBlockManager().localDirs();
        check(local.length > 0, "the executor has local dirs");
        return new File(local[partition % local.length], SPILL_SUBDIR);
    }

    /** The keys of one part of a partition: a seeded generator, so a part can be generated again. */
    static final class Keys {
        private final SplittableRandom random;
        private long left;

        Keys(long seed, int partition, int part, long rows) {
            this.random = new SplittableRandom(seed * 0x9E3779B97F4A7C15L + 2L * partition + part);
            this.left = rows;
        }

        /** Fills {@code batch} with the next keys, adding them to {@code sum}; returns how many (0 at the end). */
        int next(long[] batch, Checksum sum) {
            int n = (int) Math.min(batch.length, left);
            for (int i = 0; i < n; i++) {
                long key = random.nextLong();
                batch[i] = key;
                sum.add(key);
            }
            left -= n;
            return n;
        }
    }

    /**
     * Spark's {@link UnsafeExternalSorter} for this task, with no spill threshold but memory: its
     * {@code create} is an internal API that gained parameters across releases (3.5: the element
     * threshold; 4.1: a size threshold; 4.3: a spill merge factor), so the overload is picked by
     * its parameter count. The extra ones get the values that keep 3.5's behaviour: no size
     * threshold ({@code Long.MAX_VALUE}), merge factor -1 (disabled).
     */
    static UnsafeExternalSorter createJvmSorter(TaskContext ctx) throws IOException {
        TaskMemoryManager tmm = ctx.taskMemoryManager();
        SparkEnv env = SparkEnv.get();
        Supplier<LongRecordComparator> comparator = () -> LongRecordComparator.INSTANCE;
        Object[] common = {tmm, env.blockManager(), env.serializerManager(), ctx, comparator,
                PrefixComparators.LONG, 4096, tmm.pageSizeBytes(), Integer.MAX_VALUE};
        for (java.lang.reflect.Method m : UnsafeExternalSorter.class.getMethods()) {
            if (!m.getName().equals("create") || !java.lang.reflect.Modifier.isStatic(m.getModifiers())) {
                continue;
            }
            Object[] args;
            switch (m.getParameterCount()) {
                case 10: args = append(common, true); break;                      // 3.5, 4.0
                case 11: args = append(common, Long.MAX_VALUE, true); break;      // 4.1, 4.2
                case 12: args = append(common, Long.MAX_VALUE, -1, true); break;  // 4.3
                default: continue;
            }
            try {
                return (UnsafeExternalSorter) m.invoke(null, args);
            } catch (ReflectiveOperationException e) {
                throw new IOException("SortJob: UnsafeExternalSorter.create failed", e);
            }
        }
        throw new IllegalStateException("SortJob: no UnsafeExternalSorter.create overload known for Spark "
                + SparkApiCheck.sparkVersion(UnsafeExternalSorter.class.getClassLoader()));
    }

    private static Object[] append(Object[] head, Object... tail) {
        Object[] all = java.util.Arrays.copyOf(head, head.length + tail.length);
        System.arraycopy(tail, 0, all, head.length, tail.length);
        return all;
    }

    /** The task's sorters and the spill attribution: what spilled while which one was running. */
    static final class Sorters {
        final NativeSorter nativeSorter;
        final UnsafeExternalSorter jvm;
        final TaskResult r;
        final long[] record = new long[1];
        /** Set once the JVM sorter's output started: from then on Spark spills it for others. */
        boolean jvmInputDone;

        Sorters(NativeSorter nativeSorter, UnsafeExternalSorter jvm, TaskResult r) {
            this.nativeSorter = nativeSorter;
            this.jvm = jvm;
            this.r = r;
        }

        /** A native call; JVM bytes spilled meanwhile were spilled for native memory. */
        <T> T nativeCall(Supplier<T> call) {
            long before = jvm == null ? 0 : jvm.getSpillSize();
            T result = call.get();
            if (jvm != null) {
                r.jvmSpilledForNative += jvm.getSpillSize() - before;
            }
            return result;
        }

        /** A JVM sorter call; native bytes spilled meanwhile were spilled for Spark. */
        <T> T jvmCall(Callable<T> call) throws IOException {
            SorterStats before = nativeSorter.stats();
            T result;
            try {
                result = call.call();
            } catch (IOException | RuntimeException e) {
                throw e;
            } catch (Exception e) {
                throw new IOException(e);
            }
            SorterStats after = nativeSorter.stats();
            r.nativeSpilledForSpark += after.bytesSpilled() - before.bytesSpilled();
            r.nativeRunsForSpark += after.runs() - before.runs();
            return result;
        }

        /**
         * Inserts into the native sorter. While the JVM sorter takes input it spills only for itself
         * (Spark's design), so when it holds all of the task's share the native sorter, spilled empty
         * for it, cannot get even one chunk: the task then does what an operator beside a Spark
         * sorter must do, it makes the JVM sorter spill itself and inserts the rest of the batch (the
         * prefix already buffered is counted by {@code rowsInserted}). Those spills are counted apart
         * ({@code jvmSpilledByTask}), never as Spark's native → Spark spills.
         */
        void insertNative(long[] batch, int n) throws IOException {
            int from = 0;
            while (true) {
                long before = nativeSorter.stats().rowsInserted();
                final int offset = from;
                try {
                    nativeCall(() -> {
                        nativeSorter.insert(batch, offset, n - offset);
                        return null;
                    });
                    return;
                } catch (NativeOutOfMemoryException e) {
                    from += (int) (nativeSorter.stats().rowsInserted() - before);
                    long spilled = jvm == null || jvmInputDone ? 0 : jvm.spill(Long.MAX_VALUE, jvm);
                    if (spilled == 0) {
                        throw e;
                    }
                    r.jvmSpilledByTask += spilled;
                }
            }
        }

        void insertJvm(long[] batch, int n) throws IOException {
            jvmCall(() -> {
                for (int i = 0; i < n; i++) {
                    record[0] = batch[i];
                    jvm.insertRecord(record, Platform.LONG_ARRAY_OFFSET, 8, batch[i], false);
                }
                return null;
            });
        }
    }

    /**
     * Runs in the task: sorts the partition and checks the output.
     *
     * <p>Native sort only: generate batch, insert, repeat; then read the output. With the JVM sort:
     * <ol>
     *   <li>the first half of the keys goes to both sorters, batch by batch in turn, the second half
     *       to the JVM sorter only. Spark → native: the JVM sorter's pages make Spark ask the native
     *       manager for memory (Spark's sorters spill only for themselves while they take input);
     *   <li>the JVM sorter's output starts (its in-memory part can now be spilled for others, as when
     *       a Spark sort's consumer pulls), and the native sorter takes the second half (generated
     *       again). Native → Spark: native memory needs make Spark spill the JVM sorter;
     *   <li>both outputs are read in lockstep and must be equal.
     * </ol>
     */
    static TaskResult sortPartition(int partition, long rows, Args args) throws IOException {
        long start = System.nanoTime();
        TaskContext ctx = TaskContext.get();
        NativeMemoryManager mm = TaskNativeMemory.get();
        SparkReservationListener listener = TaskNativeMemory.listener();
        TaskResult r = new TaskResult();
        r.partition = partition;
        r.executorId = SparkEnv.get().executorId();
        r.taskAttemptId = ctx.taskAttemptId();
        r.rows = rows;

        UnsafeExternalSorter jvm = null;
        if (args.withJvmSort) {
            jvm = createJvmSorter(ctx);
        }
        Checksum in = new Checksum();
        Checksum out = new Checksum();
        long[] batch = new long[BATCH_KEYS];
        try (NativeSorter sorter = new NativeSorter(mm, "sort-p" + partition, spillDir(partition))) {
            Sorters both = new Sorters(sorter, jvm, r);
            // ---- input ------------------------------------------------------------------------
            long firstHalf = jvm == null ? rows : rows / 2;
            Keys keysA = new Keys(args.seed, partition, 0, firstHalf);
            int n;
            while ((n = keysA.next(batch, in)) > 0) {
                both.insertNative(batch, n);
                if (jvm != null) {
                    both.insertJvm(batch, n);
                }
            }
            UnsafeSorterIterator jvmOut = null;
            if (jvm != null) {
                Keys keysB = new Keys(args.seed, partition, 1, rows - firstHalf);
                while ((n = keysB.next(batch, in)) > 0) {
                    both.insertJvm(batch, n);
                }
                final UnsafeExternalSorter j = jvm;
                jvmOut = both.jvmCall(j::getSortedIterator);
                both.jvmInputDone = true;
                // The same keys again (the output checksum proves it); counted in `in` already.
                Checksum again = new Checksum();
                Keys keysB2 = new Keys(args.seed, partition, 1, rows - firstHalf);
                while ((n = keysB2.next(batch, again)) > 0) {
                    both.insertNative(batch, n);
                }
            }
            long inserted = System.nanoTime();
            r.insertNanos = inserted - start;

            // ---- output: merge, check order, count, checksums (and equality with the JVM sort) ----
            long[] keys = new long[BATCH_KEYS];
            long previous = Long.MIN_VALUE;
            while (true) {
                int k = both.nativeCall(() -> sorter.nextBatch(keys)); // the first ends the input
                for (int i = 0; i < k; i++) {
                    long key = keys[i];
                    if (key < previous) {
                        throw new AssertionError("SortJob check failed: partition " + partition
                                + " is not sorted at row " + out.count + ": " + key + " after " + previous);
                    }
                    previous = key;
                    out.add(key);
                    if (jvmOut != null) {
                        check(jvmOut.hasNext(), "partition " + partition + ": the JVM sort ended at row " + out.count);
                        jvmOut.loadNext();
                        long jvmKey = Platform.getLong(jvmOut.getBaseObject(), jvmOut.getBaseOffset());
                        if (jvmKey != key) {
                            throw new AssertionError("SortJob check failed: partition " + partition + " row "
                                    + out.count + ": native sort has " + key + ", JVM sort has " + jvmKey);
                        }
                    }
                }
                if (k < keys.length) {
                    break;
                }
            }
            check(jvmOut == null || !jvmOut.hasNext(), "partition " + partition + ": the JVM sort has extra rows");
            check(out.count == rows, "partition " + partition + ": " + out.count + " rows out of " + rows + " in");
            check(in.sameAs(out), "partition " + partition + ": checksums in " + in + ", out " + out);
            r.nativeStats = sorter.stats();
            // What the native sort wrote to its spill files: the task's Spill (Disk).
            NativeTaskMetrics.addDiskBytesSpilled(ctx, r.nativeStats.bytesSpilled());
            check(r.nativeStats.rowsInserted() == rows && r.nativeStats.rowsOutput() == rows,
                    "partition " + partition + ": sorter stats " + r.nativeStats);
            r.outputNanos = System.nanoTime() - inserted;
            if (jvm != null) {
                r.jvmPeak = jvm.getPeakMemoryUsedBytes();
                r.jvmSpilled = jvm.getSpillSize();
            }
        } finally {
            if (jvm != null) {
                jvm.cleanupResources(); // frees its pages and deletes its spill files
            }
        }
        // Nothing held (the sorter's own figures and spill files are checked above); the pool may
        // keep the slack of the reservation quantum (the default, 1 MiB): at most two quanta per
        // pool with allocations once nothing is allocated, and 0 with exact accounting (quantum 0).
        long slack = 2 * mm.config().reservationQuantum();
        check(mm.usedBytes() <= slack, "partition " + partition + ": native memory in use after close beyond "
                + slack + " bytes of slack: " + mm.usageReport());
        r.sparkSpillRequests = listener.spillRequests();
        r.sparkSpillReleased = listener.spilledBytes();
        r.totalNanos = System.nanoTime() - start;
        return r;
    }

    // ---- driver side ----------------------------------------------------------------------------

    /** Spark's view of the sort's tasks, by partition: {memoryBytesSpilled, diskBytesSpilled}. */
    static final class SparkTaskMetrics extends SparkListener {
        /** Local property that marks the sort's stage. */
        static final String MARK = "nativemem.sortJob";
        final Map<Integer, long[]> byPartition = new ConcurrentHashMap<>();
        final Set<Integer> stages = ConcurrentHashMap.newKeySet();

        @Override
        public void onStageSubmitted(SparkListenerStageSubmitted e) {
            Properties p = e.properties();
            if (p != null && "true".equals(p.getProperty(MARK))) {
                stages.add(e.stageInfo().stageId());
            }
        }

        @Override
        public void onTaskEnd(SparkListenerTaskEnd e) {
            TaskMetrics m = e.taskMetrics();
            if (!stages.contains(e.stageId()) || m == null) {
                return;
            }
            byPartition.put(e.taskInfo().index(), new long[] {m.memoryBytesSpilled(), m.diskBytesSpilled()});
        }
    }

    /** What an executor reports after the job. */
    static final class ExecutorReport implements Serializable {
        private static final long serialVersionUID = 1L;
        String executorId;
        long liveManagers;
        long usedBytes;
        long reservedBytes;
        long heldFromSparkBytes;
        long reclaimedAtCloseBytes;
        long unreturnedBytes;
        long closeFailures;
        long managersCreated;
        long managersClosed;
        long sparkSpillRequests;
        long sparkSpilledBytes;
        long liveSorters;
        long spillFilesLeft;
        long quantumBytes;
        boolean pluginLoaded;

        static ExecutorReport take() {
            ExecutorNativeMemoryStats s = TaskNativeMemory.executorStats();
            ExecutorReport r = new ExecutorReport();
            r.executorId = SparkEnv.get().executorId();
            r.liveManagers = s.liveManagers();
            r.usedBytes = s.usedBytes();
            r.reservedBytes = s.reservedBytes();
            r.heldFromSparkBytes = s.heldFromSparkBytes();
            r.reclaimedAtCloseBytes = s.reclaimedAtCloseBytes();
            r.quantumBytes = NativeMemorySparkConf.fromSparkConf(SparkEnv.get().conf()).reservationQuantumBytes();
            r.unreturnedBytes = s.unreturnedBytes();
            r.closeFailures = s.closeFailures();
            r.managersCreated = s.managersCreated();
            r.managersClosed = s.managersClosed();
            r.sparkSpillRequests = s.sparkSpillRequests();
            r.sparkSpilledBytes = s.sparkSpilledBytes();
            r.liveSorters = NativeSorter.liveSorters();
            r.pluginLoaded = NativeMemoryPlugin.executorId() != null;
            for (File dir : SparkEnv.get().blockManager().diskBlockManager().localDirs()) {
                String[] names = new File(dir, SPILL_SUBDIR).list();
                if (names != null) {
                    for (String name : names) {
                        if (name.startsWith(SPILL_FILE_PREFIX)) {
                            r.spillFilesLeft++;
                        }
                    }
                }
            }
            return r;
        }

        /** Native bytes used or reserved now, left to a manager's close, or not returned to Spark. */
        long leakedBytes() {
            return usedBytes + reservedBytes + Math.max(0, reclaimedAtCloseBytes - slackAtCloseBound())
                    + unreturnedBytes;
        }

        /**
         * reclaimedAtCloseBytes counts what the pools held at each close, and with the reservation
         * quantum (the default) that includes the pools' slack: at most two quanta of the sort's
         * pool per task once the sorter freed everything (its own figures are checked in the task).
         * Known follow-up: the gauge should count what consumers held, not the slack.
         */
        long slackAtCloseBound() {
            return managersClosed * 2 * quantumBytes;
        }
    }

    /** Runs small tasks until every executor reported once; one report per executor. */
    static List<ExecutorReport> executorReports(JavaSparkContext jsc, int executors) {
        Map<String, ExecutorReport> byExecutor = new TreeMap<>();
        for (int round = 0; round < 10 && byExecutor.size() < executors; round++) {
            int n = 4 * executors;
            List<Integer> seeds = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                seeds.add(i);
            }
            for (ExecutorReport r : jsc.parallelize(seeds, n).map(i -> {
                Thread.sleep(20);
                return ExecutorReport.take();
            }).collect()) {
                byExecutor.put(r.executorId, r);
            }
        }
        check(byExecutor.size() == executors, "reports from " + executors + " executors, got " + byExecutor.keySet());
        return new ArrayList<>(byExecutor.values());
    }

    static int executorCount(String master) {
        Matcher m = Pattern.compile("local-cluster\\[\\s*(\\d+)\\s*,").matcher(master);
        return m.find() ? Integer.parseInt(m.group(1)) : 1;
    }

    static double seconds(long nanos) {
        return nanos / 1e9;
    }

    public static void main(String[] argv) throws Exception {
        long start = System.nanoTime();
        Args args = Args.parse(argv);
        SparkConf conf = new SparkConf()
                .setIfMissing("spark.app.name", "nativemem-sort")
                .setIfMissing("spark.plugins", NativeMemoryPlugin.class.getName())
                .setIfMissing("spark.memory.offHeap.enabled", "true")
                .setIfMissing("spark.memory.offHeap.size", DEFAULT_OFF_HEAP_SIZE)
                .setIfMissing("spark.nativemem.reservationBlockSize", DEFAULT_BLOCK);
        check(conf.get("spark.plugins").contains(NativeMemoryPlugin.class.getName()),
                "spark.plugins includes " + NativeMemoryPlugin.class.getName() + ": " + conf.get("spark.plugins"));
        SparkSession spark = SparkSession.builder().config(conf).getOrCreate();
        try {
            run(spark, args, start);
        } finally {
            spark.stop();
        }
    }

    static void run(SparkSession spark, Args args, long start) throws Exception {
        JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
        SparkConf conf = jsc.getConf();
        String master = jsc.master();
        int executors = executorCount(master);
        SparkTaskMetrics sparkMetrics = new SparkTaskMetrics();
        jsc.sc().addSparkListener(sparkMetrics);

        System.out.printf(Locale.ROOT, "SortJob: Spark %s, %s: sorting %,d random longs (%s) in %d partitions, %s%n",
                spark.version(), master, args.rows, Bytes.human(args.rows * 8), args.partitions,
                args.withJvmSort ? "native sort + Spark's UnsafeExternalSorter in the same tasks" : "native sort");
        System.out.printf(Locale.ROOT, "settings: spark.memory.offHeap.enabled=%s spark.memory.offHeap.size=%s"
                + " spark.nativemem.reservationBlockSize=%s spark.nativemem.taskLimit=%s%n",
                conf.get("spark.memory.offHeap.enabled", "false"), conf.get("spark.memory.offHeap.size", "0"),
                conf.get("spark.nativemem.reservationBlockSize", "8m"), conf.get("spark.nativemem.taskLimit", "none"));

        // ---- the sort ---------------------------------------------------------------------------
        List<Integer> parts = new ArrayList<>();
        for (int i = 0; i < args.partitions; i++) {
            parts.add(i);
        }
        final Args a = args;
        final long base = args.rows / args.partitions;
        final long extra = args.rows % args.partitions;
        long jobStart = System.nanoTime();
        jsc.setJobDescription("nativemem SortJob");
        jsc.setLocalProperty(SparkTaskMetrics.MARK, "true");
        JavaRDD<TaskResult> rdd = jsc.parallelize(parts, args.partitions)
                .mapPartitionsWithIndex((index, it) -> {
                    long rows = base + (index < extra ? 1 : 0);
                    return Collections.singletonList(sortPartition(index, rows, a)).iterator();
                }, false);
        List<TaskResult> results = new ArrayList<>(rdd.collect());
        jsc.setLocalProperty(SparkTaskMetrics.MARK, null);
        long jobNanos = System.nanoTime() - jobStart;
        jsc.sc().listenerBus().waitUntilEmpty(30_000);
        results.sort((x, y) -> Integer.compare(x.partition, y.partition));

        // ---- per-task table ---------------------------------------------------------------------
        List<String> failed = new ArrayList<>();
        System.out.println();
        if (args.withJvmSort) {
            System.out.println("                 |---------------------- native sort ----------------------|"
                    + "|-------- Spark UnsafeExternalSorter --------|");
            System.out.printf(Locale.ROOT, "%4s %11s | %10s %10s %5s %8s %10s %12s || %10s %10s %10s %10s | %7s%n",
                    "part", "rows", "peak", "spilled", "runs", "spill s", "for Spark", "Spark asked",
                    "peak", "spilled", "metric", "for native", "time s");
        } else {
            System.out.printf(Locale.ROOT, "%4s %11s | %10s %10s %5s %8s %12s | %8s %8s %7s%n", "part", "rows",
                    "peak", "spilled", "runs", "spill s", "Spark asked", "insert s", "merge s", "time s");
        }
        long rows = 0;
        long spilled = 0;
        long runs = 0;
        long spillNanos = 0;
        long maxPeak = 0;
        long forSpark = 0;
        long forSparkRuns = 0;
        long asked = 0;
        long released = 0;
        long jvmSpilled = 0;
        long jvmForNative = 0;
        long jvmByTask = 0;
        long sparkMetricSpilled = 0;
        long jvmMaxPeak = 0;
        long taskNanos = 0;
        int tasksWithoutSpill = 0;
        for (TaskResult r : results) {
            SorterStats s = r.nativeStats;
            long[] sm = sparkMetrics.byPartition.get(r.partition);
            check(sm != null, "the SparkListener saw the task of partition " + r.partition);
            String asks = r.sparkSpillRequests + "/" + Bytes.human(r.sparkSpillReleased);
            if (args.withJvmSort) {
                System.out.printf(Locale.ROOT,
                        "%4d %,11d | %10s %10s %5d %8.2f %10s %12s || %10s %10s %10s %10s | %7.2f%n", r.partition,
                        r.rows, Bytes.human(s.peakMemoryBytes()), Bytes.human(s.bytesSpilled()), s.runs(),
                        seconds(s.spillTimeNanos()), Bytes.human(r.nativeSpilledForSpark), asks, Bytes.human(r.jvmPeak),
                        Bytes.human(r.jvmSpilled), Bytes.human(sm[0]), Bytes.human(r.jvmSpilledForNative), seconds(r.totalNanos));
                expect(failed, sm[0] >= r.jvmSpilled, "Spark's memoryBytesSpilled (" + sm[0] + ") counts the JVM sorter's "
                        + r.jvmSpilled + " bytes, partition " + r.partition);
            } else {
                System.out.printf(Locale.ROOT, "%4d %,11d | %10s %10s %5d %8.2f %12s | %8.2f %8.2f %7.2f%n",
                        r.partition, r.rows, Bytes.human(s.peakMemoryBytes()), Bytes.human(s.bytesSpilled()), s.runs(),
                        seconds(s.spillTimeNanos()), asks, seconds(r.insertNanos), seconds(r.outputNanos),
                        seconds(r.totalNanos));
            }
            rows += r.rows;
            spilled += s.bytesSpilled();
            runs += s.runs();
            spillNanos += s.spillTimeNanos();
            maxPeak = Math.max(maxPeak, s.peakMemoryBytes());
            forSpark += r.nativeSpilledForSpark;
            forSparkRuns += r.nativeRunsForSpark;
            asked += r.sparkSpillRequests;
            released += r.sparkSpillReleased;
            jvmSpilled += r.jvmSpilled;
            jvmForNative += r.jvmSpilledForNative;
            jvmByTask += r.jvmSpilledByTask;
            jvmMaxPeak = Math.max(jvmMaxPeak, r.jvmPeak);
            sparkMetricSpilled += sm[0];
            taskNanos += r.totalNanos;
            if (s.runs() == 0) {
                tasksWithoutSpill++;
            }
        }
        if (args.withJvmSort) {
            System.out.printf(Locale.ROOT,
                    "%4s %,11d | %10s %10s %5d %8.2f %10s %12s || %10s %10s %10s %10s | %7.2f%n", "all", rows,
                    Bytes.human(maxPeak), Bytes.human(spilled), runs, seconds(spillNanos), Bytes.human(forSpark),
                    asked + "/" + Bytes.human(released), Bytes.human(jvmMaxPeak), Bytes.human(jvmSpilled), Bytes.human(sparkMetricSpilled),
                    Bytes.human(jvmForNative), seconds(taskNanos));
        } else {
            System.out.printf(Locale.ROOT, "%4s %,11d | %10s %10s %5d %8.2f %12s | %8s %8s %7.2f%n", "all", rows,
                    Bytes.human(maxPeak), Bytes.human(spilled), runs, seconds(spillNanos), asked + "/" + Bytes.human(released), "", "",
                    seconds(taskNanos));
        }
        System.out.println("(peak: the most the sorter held at once; Spark asked: spill requests from Spark to the"
                + " task's native manager / bytes it gave back; \"all\": sums, largest peaks");
        if (args.withJvmSort) {
            System.out.println(" for Spark: native bytes spilled while the JVM sorter ran; metric: Spark's"
                    + " memoryBytesSpilled of the task (SparkListener); for native: JVM bytes spilled while the native"
                    + " sorter ran)");
        } else {
            System.out.println(" spill s: time the sorter spent spilling; time s: the whole task)");
        }

        // ---- checks on the results (reported after the summary) --------------------------------
        expect(failed, results.size() == args.partitions, results.size() + " task results for " + args.partitions
                + " partitions");
        expect(failed, rows == args.rows, "rows sorted " + rows + " == rows asked " + args.rows);
        if (args.requireSpill) {
            expect(failed, tasksWithoutSpill == 0, "every task spilled natively (" + tasksWithoutSpill
                    + " did not; --require-spill)");
            if (args.withJvmSort) {
                expect(failed, forSpark > 0 && forSparkRuns > 0, "Spark made the native sorter spill (Spark -> native)");
                expect(failed, jvmForNative > 0, "native memory made Spark spill its sorter (native -> Spark)");
            }
        }

        // ---- after the job: what the executors still hold -------------------------------------
        List<ExecutorReport> reports = executorReports(jsc, executors);
        long leaked = 0;
        StringBuilder detail = new StringBuilder();
        for (ExecutorReport r : reports) {
            leaked += r.leakedBytes();
            detail.append(String.format(Locale.ROOT, "%n  executor %s: %d live task managers (%d created, %d closed),"
                    + " %s used, %s reserved, %s held from Spark, %s left to a manager's close, %s not returned to"
                    + " Spark, %d close failures, %d live sorters, %d spill files left", r.executorId, r.liveManagers,
                    r.managersCreated, r.managersClosed, Bytes.human(r.usedBytes), Bytes.human(r.reservedBytes),
                    Bytes.human(r.heldFromSparkBytes), Bytes.human(r.reclaimedAtCloseBytes), Bytes.human(r.unreturnedBytes),
                    r.closeFailures, r.liveSorters, r.spillFilesLeft));
        }
        System.out.println();
        System.out.printf(Locale.ROOT, "checks: %d partitions sorted, %,d rows out of %,d in, checksums match%s%n",
                results.size(), rows, args.rows, args.withJvmSort ? ", native output == Spark's sort key by key" : "");
        if (args.withJvmSort) {
            System.out.printf(Locale.ROOT, "spill both ways: Spark -> native %s in %d runs (of %s in %d runs),"
                    + " %d requests got %s back; native -> Spark %s (of %s the JVM sorter spilled; Spark's"
                    + " memoryBytesSpilled %s); the tasks made the JVM sorter spill itself %s for native input%n",
                    Bytes.human(forSpark), forSparkRuns, Bytes.human(spilled), runs, asked, Bytes.human(released),
                    Bytes.human(jvmForNative), Bytes.human(jvmSpilled), Bytes.human(sparkMetricSpilled),
                    Bytes.human(jvmByTask));
        } else {
            System.out.printf(Locale.ROOT, "native: %s spilled in %d runs, largest sorter peak %s%n", Bytes.human(spilled),
                    runs, Bytes.human(maxPeak));
        }
        System.out.printf(Locale.ROOT, "leaked: %s%s%n", Bytes.human(leaked), detail);
        System.out.printf(Locale.ROOT, "time: %.1f s (sort job %.1f s, %.1f s in tasks)%n",
                seconds(System.nanoTime() - start), seconds(jobNanos), seconds(taskNanos));

        for (ExecutorReport r : reports) {
            String ctx = " on executor " + r.executorId;
            expect(failed, r.pluginLoaded, "the NativeMemoryPlugin initialized" + ctx);
            expect(failed, r.leakedBytes() == 0, "no native byte leaked" + ctx);
            expect(failed, r.heldFromSparkBytes == 0, "nothing held from Spark" + ctx);
            expect(failed, r.liveManagers == 0, "no live task manager" + ctx);
            expect(failed, r.managersCreated == r.managersClosed, "every task manager closed" + ctx);
            expect(failed, r.closeFailures == 0, "no failed close" + ctx);
            expect(failed, r.liveSorters == 0, "no live sorter" + ctx);
            expect(failed, r.spillFilesLeft == 0, "no spill file left" + ctx);
        }
        expect(failed, leaked == 0, "leaked 0 B");
        if (!failed.isEmpty()) {
            throw new AssertionError("SortJob checks failed:\n  " + String.join("\n  ", failed));
        }
        System.out.println("PASS SortJob");
    }

}
