package org.nativemem.spark;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertTrue;

import java.util.Arrays;

import org.junit.Test;

/** The executor's process view: parsing, sampling, peaks and the recommendation's arithmetic. */
public class ExecutorMemoryTest {
    private static final long MIB = 1L << 20;
    private static final long GIB = 1L << 30;

    /** Scripted sources: each field is what the next sample reads. */
    static final class FakeSources implements ExecutorMemory.Sources {
        long rss = 2 * GIB;
        long hwm = 2 * GIB;
        long heapUsed = 300 * MIB;
        long heapCommitted = GIB;
        long direct = 64 * MIB;
        long nativeUsed = 256 * MIB;
        long nativePeakFloor;
        long now = 1_000;
        int reads;

        @Override
        public long[] rss() {
            reads++;
            return new long[] {rss, hwm};
        }

        @Override
        public long heapUsed() {
            return heapUsed;
        }

        @Override
        public long heapCommitted() {
            return heapCommitted;
        }

        @Override
        public long direct() {
            return direct;
        }

        @Override
        public long nativeUsed() {
            return nativeUsed;
        }

        @Override
        public long nativePeakFloor() {
            return nativePeakFloor;
        }

        @Override
        public long nowMillis() {
            return now;
        }
    }

    @Test
    public void aTaskPeakBetweenTwoSamplesIsNotMissed() {
        FakeSources f = new FakeSources();
        f.nativeUsed = 0; // no sample saw native memory in use...
        ExecutorMemory m = new ExecutorMemory(f, 1000);
        m.sample();
        assertEquals("nothing yet", 0, m.peaks().nativeBytes);
        assertEquals(-1, ExecutorMemory.recommendedBytes(m.peaks(), true)[1]);
        f.nativePeakFloor = 4 * MIB; // ...but a task's manager peaked at 4 MiB between two samples
        ExecutorMemory.Peaks p = m.peaks();
        assertEquals(4 * MIB, p.nativeBytes);
        assertEquals("4 MiB + 10%, whole MiB", 5 * MIB, ExecutorMemory.recommendedBytes(p, true)[1]);
        assertTrue(ExecutorMemory.recommend(p, true, -1, 8 * MIB),
                ExecutorMemory.recommend(p, true, -1, 8 * MIB).contains("spark.memory.offHeap.size=5m (nativemem peak 4.0 MiB"));
        f.nativeUsed = 6 * MIB; // a sampled sum of several tasks above the largest single peak wins
        f.now += 1000;
        m.sample();
        assertEquals(6 * MIB, m.peaks().nativeBytes);
    }

    @Test
    public void parsesVmRssAndVmHwmInKib() {
        long[] v = ExecutorMemory.parseStatus(Arrays.asList("Name:\tjava", "VmHWM:\t  204800 kB", "VmRSS:\t  102400 kB"));
        assertEquals(100 * MIB, v[0]);
        assertEquals(200 * MIB, v[1]);
        long[] missing = ExecutorMemory.parseStatus(Arrays.asList("VmRSS: garbage", "VmSize: 1 kB"));
        assertEquals(-1, missing[0]);
        assertEquals(-1, missing[1]);
    }

    @Test
    public void readsThisProcessOnLinux() {
        ExecutorMemory.Snapshot s = ExecutorMemory.get().sample();
        if (System.getProperty("os.name").toLowerCase().contains("linux")) {
            assertTrue(s.toString(), s.rssBytes > 0 && s.rssHighWaterBytes >= s.rssBytes);
            assertTrue(s.toString(), s.heapCommittedBytes > 0 && s.heapUsedBytes > 0);
            assertTrue(s.toString(), s.untrackedBytes >= 0);
        }
    }

    @Test
    public void untrackedIsRssMinusHeapCommittedDirectAndNativemem() {
        ExecutorMemory m = new ExecutorMemory(new FakeSources(), 1000);
        ExecutorMemory.Snapshot s = m.sample();
        assertEquals(2 * GIB - GIB - 64 * MIB - 256 * MIB, s.untrackedBytes);
        assertEquals(2 * GIB - GIB - 256 * MIB, s.beyondNativeBytes());
        assertEquals(GIB, s.beyondHeapBytes());
        FakeSources odd = new FakeSources();
        odd.rss = 100 * MIB; // less than the heap committed (untouched heap pages are not resident)
        assertEquals(0, new ExecutorMemory(odd, 1000).sample().untrackedBytes);
        odd.rss = -1; // no /proc
        ExecutorMemory none = new ExecutorMemory(odd, 1000);
        assertEquals(-1, none.sample().untrackedBytes);
        assertTrue(ExecutorMemory.recommend(none.peaks(), true, -1, 0).startsWith("no recommendation"));
    }

    @Test
    public void samplesAtMostOncePerIntervalAndKeepsPeaksPerQuantity() {
        FakeSources f = new FakeSources();
        ExecutorMemory m = new ExecutorMemory(f, 1000);
        ExecutorMemory.Snapshot first = m.sampleIfDue();
        f.now += 999;
        f.rss = 3 * GIB;
        assertSame("inside the interval: no new sample", first, m.sampleIfDue());
        assertEquals(1, f.reads);
        f.now += 1;
        ExecutorMemory.Snapshot second = m.sampleIfDue();
        assertEquals(3 * GIB, second.rssBytes);
        assertEquals(2, f.reads);
        // Native memory peaks later, when the rss is lower: peaks are per quantity...
        f.now += 1000;
        f.rss = 2 * GIB + 512 * MIB;
        f.nativeUsed = GIB;
        m.sampleIfDue();
        ExecutorMemory.Peaks p = m.peaks();
        assertEquals(3, p.samples);
        assertEquals(3 * GIB, p.rssBytes);
        assertEquals(GIB, p.nativeBytes);
        assertEquals(2000, p.spanMillis);
        // ...and the overhead uses the largest simultaneous rss - heap - native (the second sample).
        assertSame(second, p.atPeakBeyondNative);
        assertEquals(3 * GIB - GIB - 256 * MIB, p.atPeakBeyondNative.beyondNativeBytes());
        assertEquals(3 * GIB - GIB - 256 * MIB - 64 * MIB, p.untrackedBytes);
    }

    @Test
    public void recommendationWithOffHeapShowsTheArithmetic() {
        FakeSources f = new FakeSources();
        ExecutorMemory m = new ExecutorMemory(f, 1000);
        m.sample();
        String line = ExecutorMemory.recommend(m.peaks(), true, 512 * MIB, 128 * MIB);
        // overhead: 2 GiB - 1 GiB - 256 MiB = 768 MiB, +10% = 844.8 MiB -> 845m
        assertTrue(line, line.startsWith("spark.executor.memoryOverhead=845m (peak of rss - heap committed - nativemem:"
                + " 2.0 GiB - 1.0 GiB - 256.0 MiB = 768.0 MiB [direct 64.0 MiB, untracked 704.0 MiB] + 10%; now 512m)"));
        // off-heap: 256 MiB + 10% = 281.6 MiB -> 282m
        assertTrue(line, line.contains("spark.memory.offHeap.size=282m (nativemem peak 256.0 MiB + 10%; now 128m)"));
        assertTrue(line, line.contains("1 samples over 0.0 s"));
        assertTrue(line, !line.contains("\n"));
    }

    @Test
    public void recommendationWithoutOffHeapPutsNativememInTheOverheadAndNeverGoesBelowSparksMinimum() {
        FakeSources f = new FakeSources();
        ExecutorMemory m = new ExecutorMemory(f, 1000);
        m.sample();
        String line = ExecutorMemory.recommend(m.peaks(), false, -1, 0);
        // 2 GiB - 1 GiB = 1 GiB, +10% = 1126.4 MiB -> 1127m
        assertTrue(line, line.startsWith("spark.executor.memoryOverhead=1127m (peak of rss - heap committed:"
                + " 2.0 GiB - 1.0 GiB = 1.0 GiB [nativemem 256.0 MiB, direct 64.0 MiB, untracked 704.0 MiB] + 10%;"
                + " now default)"));
        assertTrue(line, line.contains("spark.memory.offHeap.size >= 282m"));
        FakeSources small = new FakeSources();
        small.rss = GIB + 10 * MIB;
        small.nativeUsed = 0;
        ExecutorMemory s = new ExecutorMemory(small, 1000);
        s.sample();
        assertTrue(ExecutorMemory.recommend(s.peaks(), true, -1, 0)
                .startsWith("spark.executor.memoryOverhead=384m (peak of rss - heap committed - nativemem: "));
        assertTrue(ExecutorMemory.recommend(s.peaks(), true, -1, 0).contains("Spark's minimum 384m"));
        assertTrue(ExecutorMemory.recommend(s.peaks(), true, -1, 64 * MIB)
                .contains("spark.memory.offHeap.size: no nativemem use observed on this executor (now 64m)"));
    }

    @Test
    public void marginRoundsUpToWholeMebibytes() {
        assertEquals(0, ExecutorMemory.withMargin(0));
        assertEquals(MIB, ExecutorMemory.withMargin(1));
        assertEquals(11 * MIB, ExecutorMemory.withMargin(10 * MIB));
        assertEquals(1127 * MIB, ExecutorMemory.withMargin(GIB));
        assertTrue("saturates instead of overflowing", ExecutorMemory.withMargin(Long.MAX_VALUE) > 0);
    }
}
