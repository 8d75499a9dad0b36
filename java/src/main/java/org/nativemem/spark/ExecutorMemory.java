package org.nativemem.spark;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.lang.management.BufferPoolMXBean;
import java.lang.management.ManagementFactory;
import java.lang.management.MemoryMXBean;
import java.lang.management.MemoryUsage;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.List;
import java.util.Locale;

import org.nativemem.Bytes;

/**
 * The executor process's memory as YARN or Kubernetes sees it (its resident set), split by who
 * accounts for it, with the peak of each over the executor's life and a sizing recommendation
 * for {@code spark.executor.memoryOverhead} and {@code spark.memory.offHeap.size}.
 *
 * <h2>What is measured (bytes)</h2>
 * <ul>
 *   <li><b>rss</b>: the process's resident set, {@code VmRSS} of {@code /proc/self/status} (what
 *       the container limit is enforced on); {@code VmHWM}, its high-water mark kept by the kernel,
 *       is reported too. -1 where {@code /proc} is not available (then nothing is derived).
 *   <li><b>heap</b>: the JVM heap, used and committed ({@link MemoryMXBean}).
 *   <li><b>direct</b>: NIO direct buffers ({@link BufferPoolMXBean} {@code "direct"}); memory
 *       allocated through {@code Unsafe} (Netty without cleaner, Arrow) is not in it.
 *   <li><b>native</b>: what nativemem accounts for: the {@code usedBytes} of every live task
 *       manager, including allocations an engine's tracking allocator charged
 *       ({@code nativemem-track}) and Arrow buffers on the task's allocator.
 *   <li><b>untracked</b> = max(0, rss - heap committed - direct - native): resident memory nobody
 *       accounts for. That is the JVM's own native memory (metaspace, code cache, thread stacks,
 *       GC and JIT structures), memory an engine allocated outside nativemem (C/C++ libraries,
 *       Rust code on threads that were not bound), allocator fragmentation and caches. It is a
 *       lower bound: committed heap pages never touched are not resident but are subtracted.
 * </ul>
 *
 * <h2>Sampling</h2>
 * A sample reads {@code /proc/self/status} and three MXBeans (some microseconds). The executor
 * plugin samples every {@link #DEFAULT_SAMPLE_INTERVAL_MS} ms on a daemon thread; gauge reads
 * and task ends sample too, but never more often than the interval ({@link #sampleIfDue()}).
 * Peaks are per quantity, and the recommendation uses the largest <em>simultaneous</em> value of
 * rss - heap committed - native (one sample), not a difference of peaks taken at different times.
 * The native peak is not sampled only: each task manager keeps its exact high-water mark on its
 * grow path at no extra cost, and the native peak is at least the largest of those (closed or
 * live), so a short native peak between two samples is not missed (it read "no nativemem use"
 * before). What sampling can still under-read is the sum of several tasks' peaks that coincided
 * between two samples: the figure is then the largest single task's peak or the sampled sum,
 * whichever is larger.
 *
 * <h2>Recommendation</h2>
 * With {@code spark.memory.offHeap.enabled=true} (nativemem's memory comes from Spark's off-heap
 * pool): {@code offHeap.size >= native peak + 10%}, and {@code memoryOverhead >= max(384 MiB,
 * peak(rss - heap committed - native) + 10%)}. With it disabled, native memory has to fit in the
 * overhead too: {@code memoryOverhead >= max(384 MiB, peak(rss - heap committed) + 10%)}. The
 * line shows the arithmetic ({@link #recommendation}); the executor plugin logs it at shutdown.
 */
public final class ExecutorMemory {
    /** How often the executor plugin samples, and the least time between two samples (ms). */
    public static final long DEFAULT_SAMPLE_INTERVAL_MS = 1000;
    /** Spark's minimum {@code spark.executor.memoryOverhead}: 384 MiB. */
    public static final long MIN_OVERHEAD_BYTES = 384L << 20;
    /** Margin added to the observed peaks, in percent. */
    public static final int MARGIN_PERCENT = 10;

    private static final long MIB = 1L << 20;

    /** Where the numbers come from; replaced in tests. All in bytes, -1 when unknown. */
    interface Sources {
        /** @return {rss, rss high-water mark} */
        long[] rss();

        long heapUsed();

        long heapCommitted();

        long direct();

        long nativeUsed();

        /**
         * @return the largest exact native peak of one task manager so far, closed or live (each
         *     manager keeps its own high-water mark on its grow path, so no sample can miss it),
         *     bytes; 0 if none
         */
        default long nativePeakFloor() {
            return 0;
        }

        long nowMillis();
    }

    private static final ExecutorMemory INSTANCE = new ExecutorMemory(new JvmSources(), DEFAULT_SAMPLE_INTERVAL_MS);

    /** @return the process-wide instance (one executor JVM, one view) */
    public static ExecutorMemory get() {
        return INSTANCE;
    }

    private final Sources sources;
    private final long intervalMs;

    // Guarded by this.
    private Snapshot latest;
    private long samples;
    private long firstAt = -1;
    private long peakRss;
    private long peakHeapUsed;
    private long peakHeapCommitted;
    private long peakDirect;
    private long peakNative;
    private long peakUntracked;
    /** The sample with the largest rss - heap committed - native, and the one with the largest rss - heap committed. */
    private Snapshot peakBeyondNative;
    private Snapshot peakBeyondHeap;

    ExecutorMemory(Sources sources, long intervalMs) {
        this.sources = sources;
        this.intervalMs = intervalMs;
    }

    /** One sample, with the peaks so far. All sizes in bytes (-1: unknown). */
    public static final class Snapshot {
        /** Resident set now; -1 if unknown. */
        public final long rssBytes;
        /** The kernel's high-water mark of the resident set; -1 if unknown. */
        public final long rssHighWaterBytes;
        public final long heapUsedBytes;
        public final long heapCommittedBytes;
        public final long directBytes;
        /** nativemem's accounted bytes (all live task managers). */
        public final long nativeBytes;
        /** max(0, rss - heap committed - direct - native); -1 if rss is unknown. */
        public final long untrackedBytes;
        /** Time of the sample (ms). */
        public final long atMillis;

        Snapshot(long rss, long hwm, long heapUsed, long heapCommitted, long direct, long nativeUsed, long at) {
            this.rssBytes = rss;
            this.rssHighWaterBytes = hwm;
            this.heapUsedBytes = heapUsed;
            this.heapCommittedBytes = heapCommitted;
            this.directBytes = direct;
            this.nativeBytes = nativeUsed;
            this.untrackedBytes = rss < 0 ? -1 : Math.max(0, rss - heapCommitted - Math.max(0, direct) - nativeUsed);
            this.atMillis = at;
        }

        /** @return rss - heap committed - native (what the overhead must hold with off-heap on); -1 if unknown */
        public long beyondNativeBytes() {
            return rssBytes < 0 ? -1 : Math.max(0, rssBytes - heapCommittedBytes - nativeBytes);
        }

        /** @return rss - heap committed (what the overhead must hold with off-heap off); -1 if unknown */
        public long beyondHeapBytes() {
            return rssBytes < 0 ? -1 : Math.max(0, rssBytes - heapCommittedBytes);
        }

        @Override
        public String toString() {
            return "rss " + Bytes.human(rssBytes) + " (high-water " + Bytes.human(rssHighWaterBytes) + "), heap used "
                    + Bytes.human(heapUsedBytes) + " of " + Bytes.human(heapCommittedBytes) + " committed, direct "
                    + Bytes.human(directBytes) + ", nativemem " + Bytes.human(nativeBytes) + ", untracked "
                    + Bytes.human(untrackedBytes);
        }
    }

    /** Peaks over the executor's life (bytes) and the number of samples. */
    public static final class Peaks {
        public final long samples;
        public final long rssBytes;
        public final long rssHighWaterBytes;
        public final long heapUsedBytes;
        public final long heapCommittedBytes;
        public final long directBytes;
        public final long nativeBytes;
        public final long untrackedBytes;
        /** The sample with the largest rss - heap committed - native (null before the first sample). */
        public final Snapshot atPeakBeyondNative;
        /** The sample with the largest rss - heap committed (null before the first sample). */
        public final Snapshot atPeakBeyondHeap;
        /** Time from the first sample to the last (ms). */
        public final long spanMillis;

        Peaks(long samples, long rss, long hwm, long heapUsed, long heapCommitted, long direct, long nativeUsed,
                long untracked, Snapshot beyondNative, Snapshot beyondHeap, long spanMillis) {
            this.samples = samples;
            this.rssBytes = rss;
            this.rssHighWaterBytes = hwm;
            this.heapUsedBytes = heapUsed;
            this.heapCommittedBytes = heapCommitted;
            this.directBytes = direct;
            this.nativeBytes = nativeUsed;
            this.untrackedBytes = untracked;
            this.atPeakBeyondNative = beyondNative;
            this.atPeakBeyondHeap = beyondHeap;
            this.spanMillis = spanMillis;
        }
    }

    /**
     * Samples now, whatever the interval.
     *
     * @return the new sample
     */
    public synchronized Snapshot sample() {
        long[] rss = sources.rss();
        long now = sources.nowMillis();
        Snapshot s = new Snapshot(rss[0], rss[1], sources.heapUsed(), sources.heapCommitted(), sources.direct(),
                sources.nativeUsed(), now);
        latest = s;
        samples++;
        if (firstAt < 0) {
            firstAt = now;
        }
        peakRss = Math.max(peakRss, s.rssBytes);
        peakHeapUsed = Math.max(peakHeapUsed, s.heapUsedBytes);
        peakHeapCommitted = Math.max(peakHeapCommitted, s.heapCommittedBytes);
        peakDirect = Math.max(peakDirect, s.directBytes);
        peakNative = Math.max(peakNative, s.nativeBytes);
        peakUntracked = Math.max(peakUntracked, s.untrackedBytes);
        if (peakBeyondNative == null || s.beyondNativeBytes() > peakBeyondNative.beyondNativeBytes()) {
            peakBeyondNative = s;
        }
        if (peakBeyondHeap == null || s.beyondHeapBytes() > peakBeyondHeap.beyondHeapBytes()) {
            peakBeyondHeap = s;
        }
        return s;
    }

    /**
     * Samples if the last sample is older than the interval (cheap otherwise: a lock and a clock read).
     *
     * @return the latest sample
     */
    public synchronized Snapshot sampleIfDue() {
        if (latest == null || sources.nowMillis() - latest.atMillis >= intervalMs) {
            return sample();
        }
        return latest;
    }

    /**
     * The peaks so far (sampling first if due). The native peak is the larger of the sampled peak
     * (all live managers' bytes at once, one sample) and the largest exact peak of one task manager
     * ({@link Sources#nativePeakFloor()}): a task whose native memory peaked and fell between two
     * samples still counts with its whole peak.
     *
     * @return the peaks
     */
    public synchronized Peaks peaks() {
        sampleIfDue();
        long hwm = latest == null ? -1 : latest.rssHighWaterBytes;
        long nativePeak = peakNative;
        if (samples > 0) {
            nativePeak = Math.max(nativePeak, sources.nativePeakFloor());
        }
        return new Peaks(samples, peakRss, hwm, peakHeapUsed, peakHeapCommitted, peakDirect, nativePeak, peakUntracked,
                peakBeyondNative, peakBeyondHeap, latest == null ? 0 : latest.atMillis - firstAt);
    }

    /**
     * The one-line recommendation from the peaks so far (sampling first if due).
     *
     * @param offHeapEnabled {@code spark.memory.offHeap.enabled}
     * @param currentOverhead the configured {@code spark.executor.memoryOverhead} in bytes, or -1 if not set
     * @param currentOffHeap the configured {@code spark.memory.offHeap.size} in bytes
     * @return e.g. {@code spark.executor.memoryOverhead=1229m (...), spark.memory.offHeap.size=564m (...)}
     */
    public String recommendation(boolean offHeapEnabled, long currentOverhead, long currentOffHeap) {
        return recommend(peaks(), offHeapEnabled, currentOverhead, currentOffHeap);
    }

    /**
     * The figures of {@link #recommendation} alone: {@code spark.executor.memoryOverhead} and
     * {@code spark.memory.offHeap.size} in bytes, each -1 when there is no recommendation for it
     * (no readable resident set; no nativemem use, or off-heap disabled, for the off-heap size).
     *
     * @param p peaks
     * @param offHeapEnabled {@code spark.memory.offHeap.enabled}
     * @return {overhead, offHeap}, bytes, whole MiB
     */
    static long[] recommendedBytes(Peaks p, boolean offHeapEnabled) {
        if (p.samples == 0 || p.atPeakBeyondNative == null || p.atPeakBeyondNative.rssBytes < 0) {
            return new long[] {-1, -1};
        }
        if (offHeapEnabled) {
            long overhead = Math.max(MIN_OVERHEAD_BYTES, withMargin(p.atPeakBeyondNative.beyondNativeBytes()));
            return new long[] {overhead, p.nativeBytes > 0 ? withMargin(p.nativeBytes) : -1};
        }
        return new long[] {Math.max(MIN_OVERHEAD_BYTES, withMargin(p.atPeakBeyondHeap.beyondHeapBytes())), -1};
    }

    /** The arithmetic of {@link #recommendation}, on given peaks (tested on its own). */
    static String recommend(Peaks p, boolean offHeapEnabled, long currentOverhead, long currentOffHeap) {
        if (p.samples == 0 || p.atPeakBeyondNative == null || p.atPeakBeyondNative.rssBytes < 0) {
            return "no recommendation: the process's resident set is not readable here (/proc/self/status)";
        }
        StringBuilder b = new StringBuilder();
        if (offHeapEnabled) {
            Snapshot at = p.atPeakBeyondNative;
            long beyond = at.beyondNativeBytes();
            long overhead = Math.max(MIN_OVERHEAD_BYTES, withMargin(beyond));
            long offHeap = withMargin(p.nativeBytes);
            b.append("spark.executor.memoryOverhead=").append(overhead / MIB).append("m (peak of rss - heap committed"
                    + " - nativemem: ").append(Bytes.human(at.rssBytes)).append(" - ")
                    .append(Bytes.human(at.heapCommittedBytes)).append(" - ").append(Bytes.human(at.nativeBytes))
                    .append(" = ").append(Bytes.human(beyond)).append(" [direct ").append(Bytes.human(at.directBytes))
                    .append(", untracked ").append(Bytes.human(at.untrackedBytes)).append("] + ").append(MARGIN_PERCENT)
                    .append("%").append(overhead == MIN_OVERHEAD_BYTES ? ", Spark's minimum 384m" : "")
                    .append("; now ").append(currentOverhead < 0 ? "default" : currentOverhead / MIB + "m").append("), ");
            if (p.nativeBytes > 0) {
                b.append("spark.memory.offHeap.size=").append(offHeap / MIB).append("m (nativemem peak ")
                        .append(Bytes.human(p.nativeBytes)).append(" + ").append(MARGIN_PERCENT).append("%; now ")
                        .append(currentOffHeap / MIB).append("m)");
            } else {
                b.append("spark.memory.offHeap.size: no nativemem use observed on this executor (now ")
                        .append(currentOffHeap / MIB).append("m)");
            }
        } else {
            Snapshot at = p.atPeakBeyondHeap;
            long beyond = at.beyondHeapBytes();
            long overhead = Math.max(MIN_OVERHEAD_BYTES, withMargin(beyond));
            b.append("spark.executor.memoryOverhead=").append(overhead / MIB).append("m (peak of rss - heap committed: ")
                    .append(Bytes.human(at.rssBytes)).append(" - ").append(Bytes.human(at.heapCommittedBytes))
                    .append(" = ").append(Bytes.human(beyond)).append(" [nativemem ").append(Bytes.human(at.nativeBytes))
                    .append(", direct ").append(Bytes.human(at.directBytes)).append(", untracked ")
                    .append(Bytes.human(at.untrackedBytes)).append("] + ").append(MARGIN_PERCENT).append("%")
                    .append(overhead == MIN_OVERHEAD_BYTES ? ", Spark's minimum 384m" : "").append("; now ")
                    .append(currentOverhead < 0 ? "default" : currentOverhead / MIB + "m")
                    .append("); spark.memory.offHeap.enabled=false: nativemem's memory is not in Spark's"
                            + " off-heap pool, so the overhead must hold it (enable off-heap and set"
                            + " spark.memory.offHeap.size >= ").append(withMargin(p.nativeBytes) / MIB)
                    .append("m to have Spark govern it)");
        }
        b.append("; ").append(p.samples).append(" samples over ")
                .append(String.format(Locale.ROOT, "%.1f", p.spanMillis / 1000.0)).append(" s, peaks: rss ")
                .append(Bytes.human(p.rssBytes)).append(" (kernel high-water ").append(Bytes.human(p.rssHighWaterBytes))
                .append("), heap committed ").append(Bytes.human(p.heapCommittedBytes)).append(", direct ")
                .append(Bytes.human(p.directBytes)).append(", nativemem ").append(Bytes.human(p.nativeBytes))
                .append(", untracked ").append(Bytes.human(p.untrackedBytes));
        return b.toString();
    }

    /** {@code bytes} + {@link #MARGIN_PERCENT}, rounded up to a whole MiB. */
    static long withMargin(long bytes) {
        long margin = (bytes / 100) * MARGIN_PERCENT + (bytes % 100) * MARGIN_PERCENT / 100;
        if (bytes > Long.MAX_VALUE - margin - MIB) {
            return Long.MAX_VALUE / MIB * MIB; // saturate (never reached by a real process)
        }
        return (bytes + margin + MIB - 1) / MIB * MIB;
    }

    /** Reads a {@code /proc/self/status} text: {VmRSS, VmHWM} in bytes, -1 for a missing field. */
    static long[] parseStatus(List<String> lines) {
        long rss = -1;
        long hwm = -1;
        for (String line : lines) {
            if (line.startsWith("VmRSS:")) {
                rss = kib(line);
            } else if (line.startsWith("VmHWM:")) {
                hwm = kib(line);
            }
        }
        return new long[] {rss, hwm};
    }

    private static long kib(String line) {
        String[] parts = line.substring(line.indexOf(':') + 1).trim().split("\\s+");
        try {
            long v = Long.parseLong(parts[0]);
            if (v < 0) {
                return -1;
            }
            boolean kb = parts.length > 1 && parts[1].equalsIgnoreCase("kB");
            return kb ? v * 1024 : v;
        } catch (NumberFormatException | ArrayIndexOutOfBoundsException e) {
            return -1;
        }
    }

    /** The real sources: /proc, the MXBeans, nativemem's executor stats. */
    private static final class JvmSources implements Sources {
        private static final Path STATUS = Paths.get("/proc/self/status");
        private final MemoryMXBean memory = ManagementFactory.getMemoryMXBean();
        private final BufferPoolMXBean direct = directPool();

        private static BufferPoolMXBean directPool() {
            for (BufferPoolMXBean b : ManagementFactory.getPlatformMXBeans(BufferPoolMXBean.class)) {
                if ("direct".equals(b.getName())) {
                    return b;
                }
            }
            return null;
        }

        @Override
        public long[] rss() {
            if (!Files.isReadable(STATUS)) {
                return new long[] {-1, -1};
            }
            try (BufferedReader r = new BufferedReader(
                    new InputStreamReader(Files.newInputStream(STATUS), StandardCharsets.US_ASCII))) {
                java.util.ArrayList<String> lines = new java.util.ArrayList<>();
                String line;
                while ((line = r.readLine()) != null) {
                    if (line.startsWith("Vm")) {
                        lines.add(line);
                    }
                }
                return parseStatus(lines);
            } catch (IOException e) {
                return new long[] {-1, -1};
            }
        }

        @Override
        public long heapUsed() {
            MemoryUsage heap = memory.getHeapMemoryUsage();
            return heap.getUsed();
        }

        @Override
        public long heapCommitted() {
            return memory.getHeapMemoryUsage().getCommitted();
        }

        @Override
        public long direct() {
            return direct == null ? -1 : direct.getMemoryUsed();
        }

        @Override
        public long nativeUsed() {
            return TaskNativeMemory.executorStats().usedBytes();
        }

        @Override
        public long nativePeakFloor() {
            return TaskNativeMemory.executorStats().peakBytes();
        }

        @Override
        public long nowMillis() {
            return System.currentTimeMillis();
        }
    }
}
