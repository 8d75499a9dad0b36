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
    public void garbledAccumulatorsFromTheDriverAreDropped() throws Exception {
        for (byte[] garbage : new byte[][] {
                null, // not base64 (below)
                {1, 2, 3}, // not a serialization stream
                stream(2, "nativemem.peakBytes", "a string, not an accumulator"),
                stream(-5),
                stream(3, "nativemem.peakBytes") // ends early
        }) {
            Map<String, String> conf = new HashMap<>();
            conf.put(NativeTaskMetrics.CONF_KEY, garbage == null ? "not base64 !!"
                    : Base64.getEncoder().encodeToString(garbage));
            NativeTaskMetrics.install(conf);
            assertEquals(Collections.<String>emptyList(), NativeTaskMetrics.installedAccumulators());
            assertEquals(0, NativeTaskMetrics.update(null, Collections.singletonMap(NativeTaskMetrics.PEAK, 1L)));
        }
    }

    /** A stream in the wire form of the driver plugin: a count, then names and objects. */
    private static byte[] stream(int count, String... nameThenObject) throws java.io.IOException {
        java.io.ByteArrayOutputStream b = new java.io.ByteArrayOutputStream();
        try (java.io.ObjectOutputStream out = new java.io.ObjectOutputStream(b)) {
            out.writeInt(count);
            for (int i = 0; i + 1 < nameThenObject.length; i += 2) {
                out.writeUTF(nameThenObject[i]);
                out.writeObject(nameThenObject[i + 1]);
            }
            if (nameThenObject.length % 2 == 1) {
                out.writeUTF(nameThenObject[nameThenObject.length - 1]);
            }
        }
        return b.toByteArray();
    }

    @Test
    public void everyAccumulatorNameIsUniqueAndPrefixed() {
        assertEquals(8, new java.util.HashSet<>(NativeTaskMetrics.ACCUMULATOR_NAMES).size());
        for (String name : NativeTaskMetrics.ACCUMULATOR_NAMES) {
            assertTrue(name, name.startsWith("nativemem."));
        }
    }
}
