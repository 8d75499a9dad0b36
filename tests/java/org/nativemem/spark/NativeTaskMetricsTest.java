package org.nativemem.spark;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;

import java.util.Base64;
import java.util.Collections;
import java.util.HashMap;
import java.util.Map;

import org.apache.spark.util.LongAccumulator;
import org.junit.After;
import org.junit.Test;

/**
 * {@link NativeTaskMetrics} without a SparkContext: the max accumulator's algebra, and bad input
 * from the driver (missing, garbled, another class) never throws and updates nothing. Registration
 * and the trip through a real task: the Spark UI suite (tests/spark/spark-ui.sh).
 */
public class NativeTaskMetricsTest {
    @After
    public void clear() {
        NativeTaskMetrics.install(null);
    }

    @Test
    public void maxAccumulatorKeepsTheLargestValueNotTheSum() {
        NativeTaskMetrics.MaxLongAccumulator a = new NativeTaskMetrics.MaxLongAccumulator();
        assertTrue(a.isZero());
        a.add(5L << 20);
        a.add(3L << 20);
        assertEquals(Long.valueOf(5L << 20), a.value());
        NativeTaskMetrics.MaxLongAccumulator b = new NativeTaskMetrics.MaxLongAccumulator();
        b.add(7L << 20);
        a.merge(b);
        assertEquals(Long.valueOf(7L << 20), a.value());
        b.merge(a.copy());
        assertEquals(Long.valueOf(7L << 20), b.value());
        NativeTaskMetrics.MaxLongAccumulator c = (NativeTaskMetrics.MaxLongAccumulator) a.copyAndReset();
        assertTrue(c.isZero());
        assertEquals(Long.valueOf(7L << 20), a.value());
        a.reset();
        assertTrue(a.isZero());
    }

    @Test(expected = UnsupportedOperationException.class)
    public void maxAccumulatorRefusesToMergeASum() {
        @SuppressWarnings({"unchecked", "rawtypes"})
        org.apache.spark.util.AccumulatorV2<Long, Long> sum = (org.apache.spark.util.AccumulatorV2) new LongAccumulator();
        new NativeTaskMetrics.MaxLongAccumulator().merge(sum);
    }

    @Test
    public void noDriverPluginMeansNoAccumulatorsAndNoError() {
        NativeTaskMetrics.install(null);
        assertTrue(NativeTaskMetrics.installedAccumulators().isEmpty());
        NativeTaskMetrics.install(Collections.<String, String>emptyMap());
        assertEquals(0, NativeTaskMetrics.update(null, Collections.singletonMap(NativeTaskMetrics.PEAK, 1L)));
        // No task, no accumulators: recordAtClose swallows what fails (here, the null task's metrics).
        NativeTaskMetrics.recordAtClose(null, null, 1L << 20, null);
    }

    @Test
    public void garbledAccumulatorsFromTheDriverAreDroppedOrSkipped() {
        Map<String, String> conf = new HashMap<>();
        conf.put(NativeTaskMetrics.CONF_PREFIX + NativeTaskMetrics.PEAK, "not base64 !!");
        conf.put(NativeTaskMetrics.CONF_PREFIX + NativeTaskMetrics.SPILLED,
                Base64.getEncoder().encodeToString(new byte[] {1, 2, 3}));
        conf.put(NativeTaskMetrics.CONF_PREFIX + NativeTaskMetrics.SPILLS,
                Base64.getEncoder().encodeToString(NativeTaskMetrics.serialize("a string, not an accumulator")));
        conf.put(NativeTaskMetrics.CONF_PREFIX + "nativemem.fromANewerVersion", "AAAA");
        NativeTaskMetrics.install(conf);
        assertEquals(2, NativeTaskMetrics.installedAccumulators().size());
        assertFalse(NativeTaskMetrics.installedAccumulators().contains(NativeTaskMetrics.PEAK));
        Map<String, Long> values = new HashMap<>();
        values.put(NativeTaskMetrics.PEAK, 1L);
        values.put(NativeTaskMetrics.SPILLED, 2L);
        values.put(NativeTaskMetrics.SPILLS, 3L);
        // No TaskContext on this thread and none passed: the same task; every entry is unreadable.
        assertEquals(0, NativeTaskMetrics.update(null, values));
    }

    @Test
    public void everyAccumulatorNameIsUniqueAndPrefixed() {
        assertEquals(6, new java.util.HashSet<>(NativeTaskMetrics.ACCUMULATOR_NAMES).size());
        for (String name : NativeTaskMetrics.ACCUMULATOR_NAMES) {
            assertTrue(name, name.startsWith("nativemem."));
        }
    }
}
