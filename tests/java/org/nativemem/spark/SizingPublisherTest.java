package org.nativemem.spark;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.spark.scheduler.SparkListenerApplicationEnd;
import org.apache.spark.scheduler.SparkListenerEnvironmentUpdate;
import org.apache.spark.scheduler.SparkListenerEvent;
import org.junit.Test;

import scala.Tuple2;
import scala.collection.JavaConverters;

/**
 * The sizing answer on Spark's Environment page: what {@link SizingPublisher} posts (Spark's own
 * environment with the {@code nativemem.sizing*} entries among the Spark Properties) and when (at
 * the application's end; while running only when the settings changed, at most every 30 s).
 * Scala 2.12 here (the build compiles against Spark 3.5); tests/spark/spark-ui.sh runs it on
 * 3.5 and 4.3 through the history server.
 */
public class SizingPublisherTest {
    private static final long MIB = 1L << 20;

    private static HashMap<String, String> report(String id, long overhead, long offHeap) {
        Map<String, Long> f = new HashMap<>();
        f.put("rssBytes", 500 * MIB);
        f.put("rssPeakBytes", 600 * MIB);
        f.put("nativePeakBytes", 100 * MIB);
        f.put("recommendedOverheadBytes", overhead);
        f.put("recommendedOffHeapBytes", offHeap);
        f.put("atMillis", 1L);
        return new ExecutorMemoryReport(id, false, f, "executor " + id + "'s arithmetic").toMessage();
    }

    private static scala.collection.Seq<Tuple2<String, String>> seq(String... kv) {
        List<Tuple2<String, String>> l = new ArrayList<>();
        for (int i = 0; i < kv.length; i += 2) {
            l.add(new Tuple2<>(kv[i], kv[i + 1]));
        }
        return JavaConverters.asScalaBufferConverter(l).asScala();
    }

    /** An environment as Spark posts it (the sections the event log writes), or without Spark Properties. */
    private static SparkListenerEnvironmentUpdate environment(boolean withSparkProperties) {
        Map<String, scala.collection.Seq<Tuple2<String, String>>> m = new LinkedHashMap<>();
        m.put("JVM Information", seq("Java Version", "17"));
        if (withSparkProperties) {
            m.put("Spark Properties", seq("spark.app.name", "app", "nativemem.sizing", "stale"));
        }
        m.put("Classpath Entries", seq("/x.jar", "System Classpath"));
        return new SparkListenerEnvironmentUpdate(JavaConverters.mapAsScalaMapConverter(m).asScala());
    }

    private static Map<String, String> sparkProperties(SparkListenerEvent e) {
        Map<String, String> out = new LinkedHashMap<>();
        scala.collection.Seq<Tuple2<String, String>> props =
                ((SparkListenerEnvironmentUpdate) e).environmentDetails().get("Spark Properties").get();
        for (Tuple2<String, String> kv : JavaConverters.seqAsJavaListConverter(props).asJava()) {
            assertNull("one entry per key: " + kv, out.put(kv._1(), kv._2()));
        }
        return out;
    }

    @Test
    public void theApplicationEndPostsSparksEnvironmentWithTheAnswer() throws Exception {
        ApplicationMemoryView view = new ApplicationMemoryView();
        view.accept(report("1", 400 * MIB, 275 * MIB));
        view.accept(report("2", 500 * MIB, 111 * MIB));
        List<SparkListenerEvent> posted = new ArrayList<>();
        SizingPublisher p = new SizingPublisher(posted::add, view);
        p.onEnvironmentUpdate(environment(true));
        p.onApplicationEnd(new SparkListenerApplicationEnd(1L));
        assertEquals(1, posted.size());
        Map<String, String> props = sparkProperties(posted.get(0));
        assertEquals("app", props.get("spark.app.name"));
        assertEquals("500m", props.get(SizingPublisher.OVERHEAD_KEY));
        assertEquals("275m", props.get(SizingPublisher.OFF_HEAP_KEY));
        String answer = props.get(SizingPublisher.ANSWER_KEY);
        assertTrue(answer, answer.startsWith("at application end: spark.executor.memoryOverhead=500m (set by executor 2),"
                + " spark.memory.offHeap.size=275m (set by executor 1)"));
        assertTrue(answer, answer.contains("; task accumulators: "));
        // The other sections are Spark's, unchanged.
        scala.collection.Map<String, scala.collection.Seq<Tuple2<String, String>>> details =
                ((SparkListenerEnvironmentUpdate) posted.get(0)).environmentDetails();
        assertEquals(Arrays.asList("JVM Information", "Spark Properties", "Classpath Entries"),
                new ArrayList<>(JavaConverters.mapAsJavaMapConverter(details).asJava().keySet()));
        assertEquals("System Classpath", details.get("Classpath Entries").get().head()._2());
    }

    @Test
    public void whileRunningOnlyChangedSettingsAtMostEveryInterval() throws Exception {
        ApplicationMemoryView view = new ApplicationMemoryView();
        List<SparkListenerEvent> posted = new ArrayList<>();
        SizingPublisher p = new SizingPublisher(posted::add, view);
        p.onEnvironmentUpdate(environment(true));
        view.accept(report("1", 400 * MIB, 10 * MIB));
        p.reportArrived();
        assertEquals("the first answer", 1, posted.size());
        assertTrue(sparkProperties(posted.get(0)).get(SizingPublisher.ANSWER_KEY).startsWith("so far, application running: "));
        p.onEnvironmentUpdate((SparkListenerEnvironmentUpdate) posted.get(0)); // the bus delivers ours too
        view.accept(report("1", 400 * MIB, 10 * MIB));
        p.reportArrived();
        assertEquals("same settings: nothing new", 1, posted.size());
        view.accept(report("1", 401 * MIB, 10 * MIB));
        p.reportArrived();
        assertEquals("changed, but within " + SizingPublisher.REFRESH_INTERVAL_MS + " ms of the last", 1, posted.size());
        p.onApplicationEnd(new SparkListenerApplicationEnd(2L));
        assertEquals(2, posted.size());
        Map<String, String> end = sparkProperties(posted.get(1));
        assertEquals("401m", end.get(SizingPublisher.OVERHEAD_KEY));
        assertTrue(end.get(SizingPublisher.ANSWER_KEY).startsWith("at application end: "));
        // An executor's last report after the end: posted at once if it changes the answer.
        view.accept(report("2", 402 * MIB, 12 * MIB));
        p.reportArrived();
        assertEquals(3, posted.size());
        assertEquals("12m", sparkProperties(posted.get(2)).get(SizingPublisher.OFF_HEAP_KEY));
    }

    @Test
    public void withoutAnEnvironmentOrItsSparkPropertiesNothingIsPosted() throws Exception {
        ApplicationMemoryView view = new ApplicationMemoryView();
        List<SparkListenerEvent> posted = new ArrayList<>();
        SizingPublisher p = new SizingPublisher(posted::add, view);
        p.onApplicationEnd(new SparkListenerApplicationEnd(1L));
        assertEquals("no environment seen", 0, posted.size());
        p.onEnvironmentUpdate(environment(false));
        p.onApplicationEnd(new SparkListenerApplicationEnd(1L));
        assertEquals("no Spark Properties", 0, posted.size());
        assertNull(SizingPublisher.withEntries(environment(false), new HashMap<String, String>()));
    }

    @Test
    public void noReportNoRecommendationSaysNone() throws Exception {
        List<SparkListenerEvent> posted = new ArrayList<>();
        SizingPublisher p = new SizingPublisher(posted::add, new ApplicationMemoryView());
        p.onEnvironmentUpdate(environment(true));
        p.onApplicationEnd(new SparkListenerApplicationEnd(1L));
        Map<String, String> props = sparkProperties(posted.get(0));
        assertEquals("none", props.get(SizingPublisher.OVERHEAD_KEY));
        assertEquals("none", props.get(SizingPublisher.OFF_HEAP_KEY));
        assertTrue(props.get(SizingPublisher.ANSWER_KEY), props.get(SizingPublisher.ANSWER_KEY)
                .startsWith("at application end: no recommendation: no executor reported"));
    }

    @Test
    public void theMetricsSwitchDefaultsOnAndIsStrict() {
        assertTrue(NativeMemorySparkConf.defaults().metricsEnabled());
        Map<String, String> s = new HashMap<>();
        s.put(NativeMemorySparkConf.METRICS_ENABLED, "false");
        NativeMemorySparkConf off = NativeMemorySparkConf.parse(s);
        assertEquals(false, off.metricsEnabled());
        assertTrue(off.toString(), off.toString().contains("spark.nativemem.metrics.enabled=false"));
        s.put(NativeMemorySparkConf.METRICS_ENABLED, "off");
        try {
            NativeMemorySparkConf.parse(s);
            throw new AssertionError("accepted metrics.enabled=off");
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("spark.nativemem.metrics.enabled='off': expected true or false"));
        }
    }
}
