package org.nativemem.e2e;

import static org.nativemem.e2e.E2e.MiB;
import static org.nativemem.e2e.E2e.check;
import static org.nativemem.e2e.E2e.checkEq;
import static org.nativemem.e2e.E2e.expectThrows;

import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Iterator;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.arrow.memory.ArrowBuf;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.memory.OutOfMemoryException;
import org.apache.arrow.vector.BigIntVector;
import org.apache.arrow.vector.IntVector;
import org.apache.arrow.vector.VarCharVector;
import org.apache.spark.SparkConf;
import org.apache.spark.TaskContext;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.sql.SparkSession;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;
import org.nativemem.arrow.NativeAllocationListener;
import org.nativemem.arrow.NativeArrowAllocator;
import org.nativemem.spark.NativeMemoryPlugin;
import org.nativemem.spark.NativeMemorySparkConf;
import org.nativemem.spark.SparkReservationListener;
import org.nativemem.spark.TaskArrowAllocator;
import org.nativemem.spark.TaskNativeMemory;

/**
 * Arrow Java buffers on the task's budget ({@link TaskArrowAllocator}), on the Arrow Java that
 * Spark ships (12.0.1 in 3.5, 18.1.0 in 4.0). Run with the plugin, {@code
 * spark.memory.offHeap.enabled=true}, a small off-heap size and 1m reservation blocks
 * (tests.txt), on local[2] and local-cluster[2,1,1024].
 *
 * <p>Job 1: {@code spark.range(rows)} in {@value #TASKS} partitions; each task:
 * <ol>
 *   <li>gets its allocator ({@code get()} twice and {@code get(ctx)} from a helper thread: one
 *       allocator; without a TaskContext: {@link IllegalStateException});
 *   <li>lets a JVM {@code MemoryConsumer} take all the execution memory Spark has for it, and
 *       holds a native reservation of 2 MiB beside it;
 *   <li>builds Arrow vectors from its rows ({@code BigIntVector} id, {@code IntVector} id % 1000,
 *       {@code VarCharVector} "row-id") in batches of 32k rows, keeping the last
 *       {@value #LIVE_BATCHES} batches open, over {@code --passes} passes (so it allocates
 *       hundreds of MiB cumulatively): after each batch Arrow's count, the listener's, the
 *       manager's used bytes (native reservation + the listener's blocks) and what Spark holds
 *       agree exactly; the plugin's {@code arrowAllocatedBytes} gauge includes the task's Arrow
 *       bytes; then, with the JVM consumer holding all Spark has for the task again, two more
 *       Arrow blocks make Spark spill it (checked). A grow Spark refuses because another task took
 *       the pool while it ran alone (Spark spills only the asking task's consumers) must leave the
 *       accounting exact, and waits for that task (counted and printed);
 *   <li>asks for 1 GiB more than Spark has: Arrow's {@code OutOfMemoryException} with nativemem's
 *       report and its {@link NativeOutOfMemoryException} as cause, nothing charged;
 *   <li>closes its vectors and reservation and returns the checksum of its ids and the
 *       listener's counts (buffers, JNI calls, bytes).
 * </ol>
 * The driver checks the checksum over the range, prints the workload's (steps 1-3) JNI calls per
 * GiB against buffers per GiB and requires at most 1/100 of a call per buffer; every task succeeded under Spark's leak check
 * ({@code spark.unsafe.exceptionOnMemoryLeak=true}), which runs after the task's Arrow allocator
 * and manager closed.
 *
 * <p>Job 2: a task that leaves an Arrow vector open and returns normally fails the leak check with
 * Arrow's own leak text; the allocator's close freed the vector's memory (counted in
 * {@code arrowReclaimedAtCloseBytes}).
 *
 * <p>After each job, in every executor: no live manager or Arrow allocator, no native or Arrow
 * byte, nothing held from Spark ({@link E2e#assertNoLeak}).
 */
public final class ArrowJob {
    static final String PREFIX = "ArrowJob";
    static final int TASKS = 4;
    static final int BATCH_ROWS = 32 * 1024;
    static final int LIVE_BATCHES = 6;
    /** Attempts to wait for another task's memory (see {@link #newBatch}); 50 ms apart. */
    static final int WAIT_ATTEMPTS = 400;

    private ArrowJob() {
    }

    public static void main(String[] args) throws Exception {
        long rows = 2_000_000;
        int passes = 16;
        for (int i = 0; i < args.length; i++) {
            if (args[i].equals("--rows")) {
                rows = Long.parseLong(args[++i]);
            } else if (args[i].equals("--passes")) {
                passes = Integer.parseInt(args[++i]);
            } else {
                throw new IllegalArgumentException("unknown argument " + args[i]);
            }
        }
        long start = System.nanoTime();
        SparkSession spark = SparkSession.builder().appName("nativemem-e2e-arrow").getOrCreate();
        try {
            JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
            SparkConf conf = jsc.getConf();
            check(conf.get("spark.plugins", "").contains(NativeMemoryPlugin.class.getName()),
                    "spark.plugins enables " + NativeMemoryPlugin.class.getName());
            check(conf.getBoolean("spark.unsafe.exceptionOnMemoryLeak", false),
                    "spark.unsafe.exceptionOnMemoryLeak=true (scripts/spark-submit.sh sets it)");
            NativeMemorySparkConf settings = NativeMemorySparkConf.fromSparkConf(conf);
            check(settings.offHeapEnabled(), "spark.memory.offHeap.enabled=true");
            final long arrowBlock = settings.arrowBlockSizeBytes();
            final int nPasses = passes;
            int executors = E2e.executorCount(jsc.master());
            E2e.Tracker tracker = E2e.Tracker.install(jsc);

            // ---- job 1: Arrow vectors from a range beside native memory and a JVM consumer -----------
            int mark = tracker.mark(jsc);
            List<long[]> results = spark.range(0, rows, 1, TASKS).javaRDD()
                    .mapPartitions((Iterator<Long> it) -> Collections.singletonList(
                            arrowTask(it, nPasses, arrowBlock)).iterator())
                    .collect();
            tracker.awaitIdle(jsc, 120_000);
            List<E2e.TaskEnd> ends = tracker.endedSince(mark);
            checkEq(TASKS, ends.size(), "one attempt per task: " + ends);
            for (E2e.TaskEnd end : ends) {
                check(end.reason.equals("Success"), "the task succeeded (Spark's leak check passed): " + end);
            }
            long checksum = 0;
            long seen = 0;
            long buffers = 0;
            long calls = 0;
            long bytes = 0;
            long jvmSpills = 0;
            for (long[] r : results) {
                checksum += r[1];
                seen += r[2];
                buffers += r[3];
                calls += r[4];
                bytes += r[5];
                jvmSpills += r[6];
                System.out.printf(Locale.ROOT, "%s task %d: %d rows x %d passes; %d Arrow buffers, %d MiB cumulative,"
                        + " peak %d MiB Arrow; %d JNI calls; the JVM consumer (%d MiB from Spark) spilled %d time(s) for"
                        + " Arrow; gauge arrowAllocatedBytes saw %d MiB; %d grow(s) waited for another task's"
                        + " memory%n", PREFIX, r[0], r[2], nPasses, r[3],
                        r[5] / MiB, r[7] / MiB, r[4], r[9] / MiB, r[6], r[8] / MiB, r[10]);
            }
            checkEq(rows, seen, "rows seen");
            checkEq(rows * (rows - 1) / 2, checksum, "sum of the ids read back from the Arrow vectors");
            check(jvmSpills >= TASKS, "Spark spilled the JVM consumer for Arrow in every task: " + jvmSpills);
            double gib = bytes / (double) (1L << 30);
            System.out.printf(Locale.ROOT, "%s: Arrow JNI calls: %d calls for %d buffers (%.2f GiB cumulative, %d MiB"
                    + " blocks): %.1f calls/GiB vs %.0f buffers/GiB = 1/%.0f of a call per buffer%n", PREFIX, calls,
                    buffers, gib, arrowBlock / MiB, calls / gib, buffers / gib, buffers / (double) calls);
            check(calls * 100 <= buffers, "at most 1/100 of a JNI call per Arrow buffer: " + calls + " for " + buffers);
            List<E2e.ExecutorReport> reports = E2e.assertNoLeak(jsc, executors, "after the Arrow tasks");

            // ---- job 2: a task that leaks an Arrow vector -----------------------------------------------
            mark = tracker.mark(jsc);
            long reclaimedBefore = E2e.sum(reports, "arrowReclaimedAtCloseBytes");
            expectThrows(Exception.class, () -> jsc.parallelize(Collections.singletonList(0), 1).foreach(i -> {
                leakTask();
            }), "Arrow buffers still open", "Memory was leaked", "Allocator tree:",
                    "spark.unsafe.exceptionOnMemoryLeak=true");
            tracker.awaitIdle(jsc, 60_000);
            int attempts = tracker.endedSince(mark).size();
            check(attempts >= 1, "the leaking task ran");
            reports = E2e.assertNoLeak(jsc, executors, "after the leaking Arrow task");
            long reclaimed = E2e.sum(reports, "arrowReclaimedAtCloseBytes") - reclaimedBefore;
            check(reclaimed >= attempts * 4L * 100_000, "each leaking attempt's 100k-int vector was freed: " + reclaimed);

            System.out.printf(Locale.ROOT, "PASS %s: Spark %s, %s: Arrow vectors from range(%d) in %d tasks beside native"
                    + " memory, Spark spilled the JVM consumer for Arrow %d time(s), accounting exact per batch, Arrow"
                    + " OOM carried nativemem's report, gauges saw Arrow's bytes, Spark leak check passed; %.1f JNI"
                    + " calls/GiB vs %.0f buffers/GiB; a leaked vector failed the leak check with Arrow's text in %d"
                    + " attempt(s), %d bytes freed; nothing left on %d executor(s) (%.1f s)%n", PREFIX, spark.version(),
                    jsc.master(), rows, TASKS, jvmSpills, calls / gib, buffers / gib, attempts, reclaimed, executors,
                    (System.nanoTime() - start) / 1e9);
        } finally {
            spark.stop();
        }
    }

    /**
     * Runs in the task. Returns {task attempt, sum of ids, rows, Arrow buffers, JNI calls,
     * cumulative Arrow bytes, JVM consumer spills, peak Arrow bytes, largest arrowAllocatedBytes
     * gauge seen, what Spark gave the JVM consumer, grows refused while another task held the pool}.
     */
    static long[] arrowTask(Iterator<Long> it, int passes, long arrowBlock) throws Exception {
        TaskContext ctx = TaskContext.get();
        TaskMemoryManager tmm = ctx.taskMemoryManager();
        long[] ids = readAll(it);

        // 1. One allocator per task attempt, from any of its threads.
        BufferAllocator alloc = TaskArrowAllocator.get();
        check(alloc == TaskArrowAllocator.get(), "get() returns the task's allocator");
        NativeArrowAllocator nat = TaskArrowAllocator.nativeAllocator(ctx);
        check(nat.allocator() == alloc, "the same allocator");
        NativeAllocationListener l = nat.listener();
        checkEq(arrowBlock, l.blockBytes(), "block size from spark.nativemem.arrowBlockSize");
        check(nat.freesLeakedMemory(), "the tracking allocation manager is in use");
        AtomicReference<Throwable> failure = new AtomicReference<>();
        Thread helper = new Thread(() -> {
            try {
                expectThrows(IllegalStateException.class, TaskArrowAllocator::get, "outside a Spark task");
                check(TaskArrowAllocator.get(ctx) == alloc, "get(ctx) from a task's thread: the task's allocator");
            } catch (Throwable t) {
                failure.set(t);
            }
        }, "arrow-helper");
        helper.start();
        helper.join();
        if (failure.get() != null) {
            throw new AssertionError("helper thread", failure.get());
        }
        NativeMemoryManager mm = TaskNativeMemory.get();
        check(l.manager() == mm, "charged to the task's manager");
        SparkReservationListener spark = TaskNativeMemory.listener();

        long[] refusals = {0}; // Arrow grows refused while another task held the pool (retried)
        // 2. A JVM consumer takes everything Spark has for the task; native memory beside Arrow.
        JvmConsumer jvm = new JvmConsumer(tmm, MemoryMode.OFF_HEAP);
        long capacity = jvm.acquire(1L << 40);
        check(capacity > 0, "the JVM consumer got memory");
        NativeReservation nativeOp = mm.newReservation("native/op", "e2e-native", 2 * MiB);
        int spillsBefore = jvm.spills; // Spark may have spilled it for the native reservation

        // 3. Vectors from the range, batch by batch; the last LIVE_BATCHES stay open.
        long sum = 0;
        long gaugeMax = 0;
        ArrayDeque<Batch> live = new ArrayDeque<>();
        for (int pass = 0; pass < passes; pass++) {
            for (int from = 0; from < ids.length; from += BATCH_ROWS) {
                Batch b = newBatch(alloc, ids, from, Math.min(ids.length, from + BATCH_ROWS), l, mm, spark, refusals);
                if (pass == 0) {
                    sum += b.sumIds();
                }
                live.add(b);
                if (live.size() > LIVE_BATCHES) {
                    live.poll().close();
                }
                long arrowBytes = alloc.getAllocatedMemory();
                checkEq(arrowBytes, l.allocatedBytes(), "the listener saw what Arrow counts");
                checkEq(2 * MiB + l.reservedBytes(), mm.usedBytes(), "manager used = native op + Arrow's blocks");
                check(l.reservedBytes() >= arrowBytes && l.reservedBytes() - arrowBytes <= 2 * arrowBlock,
                        "Arrow's blocks cover it with at most two blocks of cushion: " + l);
                checkEq(mm.reservedBytes(), spark.heldBytes(), "Spark holds exactly what the manager reserved");
                Map<String, Long> gauges = NativeMemoryPlugin.executorMetrics();
                long gauge = gauges.get("arrowAllocatedBytes");
                check(gauge >= arrowBytes, "gauge arrowAllocatedBytes " + gauge + " includes the task's " + arrowBytes);
                check(gauges.get("arrowAllocators") >= 1, "gauge arrowAllocators: " + gauges);
                check(gauges.get("usedBytes") >= mm.usedBytes(), "gauge usedBytes includes the arrow pool");
                gaugeMax = Math.max(gaugeMax, gauge);
            }
        }

        // The workload's counters (3b adds a forced grow and shrink per attempt on purpose).
        long buffers = l.allocations();
        long calls = l.jniCalls();
        long bytes = l.allocatedTotalBytes();

        // 3b. Arrow -> Spark: with the JVM consumer holding all Spark has for the task again, two
        // more blocks of Arrow make Spark spill it (retried if another task ended in between and freed
        // memory, so the grow was served without a spill).
        int forced = 0;
        for (int attempt = 0; attempt < 200 && forced == 0; attempt++) {
            jvm.acquire(1L << 40);
            int before = jvm.spills;
            check(l.allocatedBytes() + 2 * arrowBlock > l.reservedBytes(), "two more blocks need a grow: " + l);
            ArrowBuf extra = null;
            try {
                extra = alloc.buffer(2 * arrowBlock);
            } catch (OutOfMemoryException e) {
                // Spark spilled the JVM consumer but the pool had no more: another task took it while
                // it ran alone (Spark never spills one task for another). Nothing may be charged.
                check(e.getCause() instanceof NativeOutOfMemoryException, "cause: " + e.getCause());
                refusals[0]++;
                Thread.sleep(50);
            }
            forced = extra == null ? 0 : jvm.spills - before;
            checkEq(alloc.getAllocatedMemory(), l.allocatedBytes(), "the listener saw the extra buffer");
            checkEq(2 * MiB + l.reservedBytes(), mm.usedBytes(), "manager used with the extra buffer");
            checkEq(mm.reservedBytes(), spark.heldBytes(), "Spark holds exactly what the manager reserved");
            if (extra != null) {
                extra.close();
            }
        }
        check(forced >= 1, "Spark spilled the JVM consumer for Arrow's blocks");
        int arrowSpills = jvm.spills - spillsBefore;

        // 4. More than Spark has: Arrow's OutOfMemoryException with nativemem's report, nothing charged.
        long arrowBefore = alloc.getAllocatedMemory();
        long reservedBefore = l.reservedBytes();
        jvm.spillable = false;
        OutOfMemoryException oom = expectThrows(OutOfMemoryException.class, () -> alloc.buffer(1L << 30),
                "nativemem: Arrow allocation", "pool 'arrow'");
        check(oom.getCause() instanceof NativeOutOfMemoryException, "cause: " + oom.getCause());
        check(oom.getMessage().contains(oom.getCause().getMessage()), "the message carries nativemem's report");
        checkEq(arrowBefore, alloc.getAllocatedMemory(), "Arrow allocated nothing");
        checkEq(arrowBefore, l.allocatedBytes(), "nothing charged");
        checkEq(reservedBefore, l.reservedBytes(), "the listener's blocks unchanged");
        checkEq(mm.reservedBytes(), spark.heldBytes(), "Spark holds exactly what the manager reserved after the OOM");
        jvm.spillable = true;

        // 5. Done: everything closed by the task itself.
        while (!live.isEmpty()) {
            live.poll().close();
        }
        checkEq(0, alloc.getAllocatedMemory(), "Arrow bytes after closing the vectors");
        checkEq(0, l.allocatedBytes(), "listener bytes after closing the vectors");
        nativeOp.close();
        jvm.releaseAll();
        // JNI calls of the workload: opening the reservation, grows and shrinks, plus the listener's
        // close at task end.
        return new long[] {ctx.taskAttemptId(), sum, ids.length, buffers, calls + 1, bytes, arrowSpills,
            l.peakAllocatedBytes(), gaugeMax, capacity, refusals[0]};
    }

    /**
     * A batch, waiting for memory another task holds. Spark spills a task's own consumers for its
     * grow but never another task's: a task that ran alone for a moment may have taken most of the
     * pool with its JVM consumer, and the grow is refused until that task frees it (it does when it
     * ends). A refusal must leave the accounting exact; it is retried every 50 ms.
     */
    static Batch newBatch(BufferAllocator alloc, long[] ids, int from, int to, NativeAllocationListener l,
            NativeMemoryManager mm, SparkReservationListener spark, long[] refusals) throws InterruptedException {
        for (int attempt = 1;; attempt++) {
            try {
                return new Batch(alloc, ids, from, to);
            } catch (OutOfMemoryException e) {
                if (attempt >= WAIT_ATTEMPTS) {
                    throw e;
                }
                check(e.getCause() instanceof NativeOutOfMemoryException, "cause: " + e.getCause());
                checkEq(alloc.getAllocatedMemory(), l.allocatedBytes(), "a refused batch: the listener's count");
                checkEq(mm.reservedBytes(), spark.heldBytes(), "a refused batch: Spark holds what the manager reserved");
                refusals[0]++;
                Thread.sleep(50);
            }
        }
    }

    /** Runs in the task: an Arrow vector left open, then a normal return. */
    static void leakTask() {
        IntVector forgotten = new IntVector("forgotten", TaskArrowAllocator.get());
        forgotten.allocateNew(100_000);
        forgotten.setValueCount(100_000);
    }

    private static long[] readAll(Iterator<Long> it) {
        List<Long> values = new ArrayList<>();
        while (it.hasNext()) {
            values.add(it.next());
        }
        long[] out = new long[values.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = values.get(i);
        }
        return out;
    }

    /** One batch of rows as three Arrow vectors. */
    static final class Batch implements AutoCloseable {
        final BigIntVector id;
        final IntVector mod;
        final VarCharVector name;

        Batch(BufferAllocator alloc, long[] ids, int from, int to) {
            id = new BigIntVector("id", alloc);
            mod = new IntVector("mod", alloc);
            name = new VarCharVector("name", alloc);
            try {
                int n = to - from;
                id.allocateNew(n);
                mod.allocateNew(n);
                name.allocateNew(n * 12L, n);
                for (int i = 0; i < n; i++) {
                    long v = ids[from + i];
                    id.set(i, v);
                    mod.set(i, (int) (v % 1000));
                    name.setSafe(i, ("row-" + v).getBytes(StandardCharsets.UTF_8));
                }
                id.setValueCount(n);
                mod.setValueCount(n);
                name.setValueCount(n);
            } catch (RuntimeException e) {
                close(); // a refused allocation: nothing of the batch stays
                throw e;
            }
        }

        long sumIds() {
            long s = 0;
            for (int i = 0; i < id.getValueCount(); i++) {
                long v = id.get(i);
                check(mod.get(i) == (int) (v % 1000), "mod column");
                s += v;
            }
            String last = new String(name.get(id.getValueCount() - 1), StandardCharsets.UTF_8);
            check(last.equals("row-" + id.get(id.getValueCount() - 1)), "name column: " + last);
            return s;
        }

        @Override
        public void close() {
            id.close();
            mod.close();
            name.close();
        }
    }
}
