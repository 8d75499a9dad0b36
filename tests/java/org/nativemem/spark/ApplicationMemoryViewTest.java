package org.nativemem.spark;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;

import java.util.HashMap;
import java.util.Map;

import org.junit.Test;

import com.codahale.metrics.Gauge;
import com.codahale.metrics.MetricRegistry;

/**
 * The driver's view of executor memory reports: aggregation into the driver gauges, the sizing
 * answer across executors, and bad input (other messages, other versions, garbage) ignored.
 */
public class ApplicationMemoryViewTest {
    private static final long MIB = 1L << 20;

    private static HashMap<String, String> report(String id, long rss, long rssPeak, long nativePeak, long headroom,
            long live, long overhead, long offHeap) {
        Map<String, Long> f = new HashMap<>();
        f.put("rssBytes", rss);
        f.put("rssPeakBytes", rssPeak);
        f.put("nativePeakBytes", nativePeak);
        f.put("untrackedPeakBytes", 10 * MIB);
        f.put("taskPeakBytes", nativePeak / 2);
        f.put("liveTaskManagers", live);
        f.put("containerLimitBytes", headroom < 0 ? -1 : 4096 * MIB);
        f.put("containerHeadroomBytes", headroom);
        f.put("recommendedOverheadBytes", overhead);
        f.put("recommendedOffHeapBytes", offHeap);
        f.put("atMillis", 1L);
        return new ExecutorMemoryReport(id, false, f, "executor " + id + "'s arithmetic").toMessage();
    }

    @Test
    public void gaugesAggregateTheLastReportOfEachExecutor() {
        ApplicationMemoryView v = new ApplicationMemoryView();
        assertEquals(Long.valueOf(-1), v.gaugeValues().get("maxExecutorRssBytes"));
        assertTrue(v.accept(report("1", 500 * MIB, 600 * MIB, 200 * MIB, 900 * MIB, 2, 400 * MIB, 220 * MIB)));
        assertTrue(v.accept(report("2", 700 * MIB, 700 * MIB, 100 * MIB, -1, 1, 500 * MIB, 111 * MIB)));
        // executor 1 again: its newer report replaces the older one
        assertTrue(v.accept(report("1", 550 * MIB, 650 * MIB, 250 * MIB, 800 * MIB, 0, 450 * MIB, 275 * MIB)));
        Map<String, Long> g = v.gaugeValues();
        assertEquals(Long.valueOf(2), g.get("executorsReporting"));
        assertEquals(Long.valueOf(700 * MIB), g.get("maxExecutorRssBytes"));
        assertEquals(Long.valueOf(700 * MIB), g.get("maxExecutorRssPeakBytes"));
        assertEquals(Long.valueOf(250 * MIB), g.get("maxExecutorNativePeakBytes"));
        assertEquals(Long.valueOf(125 * MIB), g.get("maxTaskNativePeakBytes"));
        assertEquals("only executor 1 knows its container", Long.valueOf(800 * MIB), g.get("minContainerHeadroomBytes"));
        assertEquals(Long.valueOf(1), g.get("liveTaskManagers"));
        assertEquals(Long.valueOf(500 * MIB), g.get("recommendedMemoryOverheadBytes"));
        assertEquals(Long.valueOf(275 * MIB), g.get("recommendedOffHeapBytes"));

        MetricRegistry registry = new MetricRegistry();
        v.registerGauges(registry);
        assertEquals(ApplicationMemoryView.GAUGE_NAMES.size(), registry.getGauges().size());
        assertEquals(700 * MIB, ((Gauge<?>) registry.getGauges().get("maxExecutorRssPeakBytes")).getValue());
    }

    @Test
    public void sizingTakesTheLargestRecommendationAndNamesItsExecutor() {
        ApplicationMemoryView v = new ApplicationMemoryView();
        assertTrue(v.sizing(), v.sizing().startsWith("no recommendation: no executor reported"));
        v.accept(report("1", 500 * MIB, 600 * MIB, 200 * MIB, -1, 0, 400 * MIB, 275 * MIB));
        v.accept(report("2", 700 * MIB, 700 * MIB, 100 * MIB, -1, 0, 500 * MIB, 111 * MIB));
        String s = v.sizing();
        assertTrue(s, s.startsWith("spark.executor.memoryOverhead=500m (set by executor 2),"
                + " spark.memory.offHeap.size=275m (set by executor 1); max over 2 executor(s)"));
        assertTrue(s, s.contains("executor 2: executor 2's arithmetic"));
        assertTrue(s, s.contains("executor 1: executor 1's arithmetic"));
    }

    @Test
    public void otherMessagesAndOtherVersionsAreHarmless() {
        ApplicationMemoryView v = new ApplicationMemoryView();
        assertFalse(v.accept(null));
        assertFalse(v.accept("a string"));
        assertFalse(v.accept(new HashMap<String, String>())); // no marker
        HashMap<Object, Object> noId = new HashMap<>();
        noId.put(ExecutorMemoryReport.KIND_KEY, "1");
        assertFalse(v.accept(noId));
        // A future version: unknown keys, a figure that is not a number, another value type.
        HashMap<Object, Object> future = new HashMap<>();
        future.put(ExecutorMemoryReport.KIND_KEY, "7");
        future.put("executorId", "9");
        future.put("rssBytes", "lots");
        future.put("rssPeakBytes", 5L);
        future.put("nativePeakBytes", String.valueOf(3 * MIB));
        future.put("someNewFigure", "1");
        future.put(42, new Object());
        assertTrue(v.accept(future));
        Map<String, Long> g = v.gaugeValues();
        assertEquals(Long.valueOf(-1), g.get("maxExecutorRssBytes"));
        assertEquals(Long.valueOf(-1), g.get("maxExecutorRssPeakBytes"));
        assertEquals(Long.valueOf(3 * MIB), g.get("maxExecutorNativePeakBytes"));
        assertTrue(v.sizing(), v.sizing().contains("memoryOverhead: no recommendation"));
        assertNull(ExecutorMemoryReport.fromMessage(42));
    }

    @Test
    public void aLastReportIsNotReplacedByAnOlderPeriodicOne() {
        ApplicationMemoryView v = new ApplicationMemoryView();
        HashMap<String, String> last = report("1", 500 * MIB, 900 * MIB, 200 * MIB, -1, 0, 400 * MIB, 220 * MIB);
        last.put("last", "true");
        v.accept(last);
        v.accept(report("1", 100 * MIB, 100 * MIB, 1 * MIB, -1, 3, 400 * MIB, 220 * MIB));
        assertEquals(Long.valueOf(900 * MIB), v.gaugeValues().get("maxExecutorRssPeakBytes"));
        assertEquals(Long.valueOf(0), v.gaugeValues().get("liveTaskManagers"));
    }

    @Test
    public void thisProcesssReportSurvivesTheWireForm() {
        ExecutorMemoryReport r = ExecutorMemoryReport.take("7", true, true, -1, 0);
        ExecutorMemoryReport back = ExecutorMemoryReport.fromMessage(r.toMessage());
        assertEquals("7", back.executorId());
        assertTrue(back.isLast());
        assertFalse(back.differsFrom(r));
        assertTrue("this JVM's resident set is readable here", back.figure("rssBytes") > 0);
        assertTrue(back.figure("recommendedOverheadBytes") >= ExecutorMemory.MIN_OVERHEAD_BYTES);
        assertEquals(r.recommendation(), back.recommendation());
    }
}
