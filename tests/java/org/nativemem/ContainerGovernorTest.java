package org.nativemem;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import org.junit.After;
import org.junit.Test;

/**
 * The container governor through the Java API: a configured limit far below what this JVM uses
 * puts the executor under hard pressure at once, so a native grow that needs new memory from the
 * listener fails naming the container while reserved memory still serves; stopping lifts it.
 */
public class ContainerGovernorTest extends NativeTestSupport {

    @After
    public void stopGovernor() {
        ContainerGovernor.stop();
    }

    @Test
    public void hardPressureRefusesNewMemoryUntilStopped() throws Exception {
        CountingListener listener = new CountingListener();
        NativeMemoryManager m = manager("governed", listener);
        NativeReservation held = m.newReservation("op", "held", 3 * BLOCK + BLOCK / 2);
        long reservedBefore = listener.reserved.get();

        // A JVM uses far more than 16 MiB of anonymous memory: hard pressure from the first sample.
        String started = ContainerGovernor.start(16 * MIB, ContainerGovernor.DEFAULT_SOFT_LEVEL,
                ContainerGovernor.DEFAULT_HARD_LEVEL);
        assertTrue(started, started.startsWith("governing the container: "));
        assertTrue(started, started.contains("limit 16.0 MiB (spark.nativemem.containerLimit)"));
        assertTrue(started, started.contains("soft level 85%, hard level 93%"));
        assertEquals("the container governor runs already",
                ContainerGovernor.start(16 * MIB, 0.85, 0.93));
        ContainerGovernor.Status s = awaitPressure(2);
        assertTrue(s.toString(), s.running());
        assertEquals(16 * MIB, s.limitBytes());
        assertTrue(s.toString(), s.anonymousBytes() > 16 * MIB && s.headroomBytes() == 0);
        assertTrue(s.toString(), s.softEntries() >= 1 && s.hardEntries() >= 1 && s.giveBacks() >= 1);

        // The soft step gave the idle half block back to the listener.
        assertEquals(held.size(), listener.reserved.get());
        assertTrue(listener.reserved.get() < reservedBefore);

        // What is reserved still serves; new memory from the listener is refused.
        int calls = listener.reserveCalls.get();
        try {
            held.grow(2 * BLOCK);
            fail("a grow needing the listener under hard pressure");
        } catch (NativeOutOfMemoryException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("container memory pressure"));
            assertTrue(e.getMessage(), e.getMessage().contains("of the container's 16.0 MiB limit (hard level 93%)"));
            assertTrue(e.getMessage(), e.getMessage().contains("Native memory of 'governed'"));
        }
        assertEquals("the listener was not asked", calls, listener.reserveCalls.get());
        assertEquals(3 * BLOCK + BLOCK / 2, held.size());
        assertTrue(ContainerGovernor.status().refusedGrows() >= 1);
        String forensics = ContainerGovernor.forensics();
        assertNotNull(forensics);
        assertTrue(forensics, forensics.contains("pressure hard"));
        assertTrue(forensics, forensics.contains("Native memory of 'governed'"));

        ContainerGovernor.stop();
        assertFalse(ContainerGovernor.status().running());
        assertEquals(0, ContainerGovernor.status().pressure());
        assertNull(ContainerGovernor.forensics());
        held.grow(2 * BLOCK);
        assertEquals(5 * BLOCK + BLOCK / 2, held.size());
        held.close();
        m.close();
        assertEquals(0, listener.reserved.get());
    }

    @Test
    public void withoutALimitItWatchesTheCgroupOrSaysWhyNot() {
        String started = ContainerGovernor.start(0, 0.85, 0.93);
        // In a memory cgroup (limited or not) it runs, watching for a limit; outside any, with
        // no configured limit, there is nothing to govern. The answer and the state agree.
        boolean running = ContainerGovernor.status().running();
        assertEquals(started, running, started.startsWith("governing the container: "));
        if (!running) {
            assertTrue(started, started.startsWith("no container governor: Process: no memory limit"));
        } else if (ContainerGovernor.status().limitBytes() == 0) {
            assertTrue(started, started.contains("no memory limit yet"));
            assertEquals(0, ContainerGovernor.status().pressure());
        }
    }

    @Test
    public void badLevelsAreRefused() {
        expectIllegalArgument(0.9, 0.8, "hard level 0.8 must be in [soft 0.9, 1]");
        expectIllegalArgument(0, 0.5, "soft level 0 must be in (0, 1]");
        expectIllegalArgument(0.85, 1.5, "hard level 1.5");
        try {
            ContainerGovernor.start(-1, 0.85, 0.93);
            fail("negative limit");
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("container limit"));
        }
        assertFalse(ContainerGovernor.status().running());
    }

    private static void expectIllegalArgument(double soft, double hard, String text) {
        try {
            ContainerGovernor.start(16 * MIB, soft, hard);
            fail("levels " + soft + ", " + hard);
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(text));
        }
    }

    private static ContainerGovernor.Status awaitPressure(int level) throws InterruptedException {
        long deadline = System.nanoTime() + 20_000_000_000L;
        ContainerGovernor.Status s = ContainerGovernor.status();
        // The level is published at the sample; the counts once the tick (with its relief) ended.
        while ((s.pressure() != level || (level == 2 && s.hardEntries() == 0)) && System.nanoTime() < deadline) {
            Thread.sleep(5);
            s = ContainerGovernor.status();
        }
        assertEquals(s.toString(), level, s.pressure());
        return s;
    }
}
