package org.nativemem.spark;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.HashMap;
import java.util.Map;

import org.junit.Test;

/** The container governor's settings: defaults, values, and strict refusals naming the key. */
public class GovernorSettingsTest {

    @Test
    public void defaultsGovernWithTheDocumentedLevels() {
        NativeMemorySparkConf.Governor g = NativeMemorySparkConf.defaults().governor();
        assertTrue(g.enabled());
        assertEquals(0, g.containerLimitBytes());
        assertEquals(0.85, g.softLevel(), 0);
        assertEquals(0.93, g.hardLevel(), 0);
        assertTrue(NativeMemorySparkConf.defaults().toString(), NativeMemorySparkConf.defaults().toString()
                .contains("spark.nativemem.governor.enabled=true, spark.nativemem.containerLimit=none"));
    }

    @Test
    public void valuesAreRead() {
        Map<String, String> s = new HashMap<>();
        s.put("spark.nativemem.governor.enabled", "false");
        s.put("spark.nativemem.containerLimit", "6g");
        s.put("spark.nativemem.governor.softLevel", "0.7");
        s.put("spark.nativemem.governor.hardLevel", "0.9");
        NativeMemorySparkConf.Governor g = NativeMemorySparkConf.parse(s).governor();
        assertEquals(false, g.enabled());
        assertEquals(6L << 30, g.containerLimitBytes());
        assertEquals(0.7, g.softLevel(), 0);
        assertEquals(0.9, g.hardLevel(), 0);
    }

    @Test
    public void badValuesFailNamingTheKey() {
        expectInvalid("spark.nativemem.governor.softLevel", "1.2", "a fraction in (0, 1]");
        expectInvalid("spark.nativemem.governor.hardLevel", "high", "a fraction of the container limit");
        expectInvalid("spark.nativemem.governor.hardLevel", "0.5", "a level at or above spark.nativemem.governor.softLevel=0.85");
        expectInvalid("spark.nativemem.containerLimit", "0", "a size greater than 0");
        expectInvalid("spark.nativemem.governor.enabled", "yes", "true or false");
        expectInvalid("spark.nativemem.governor.level", "1", "unknown setting");
    }

    private static void expectInvalid(String key, String value, String text) {
        Map<String, String> s = new HashMap<>();
        s.put(key, value);
        try {
            NativeMemorySparkConf.parse(s);
            fail(key + "=" + value);
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(key));
            assertTrue(e.getMessage(), e.getMessage().contains(text));
        }
    }
}
