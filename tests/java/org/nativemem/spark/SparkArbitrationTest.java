package org.nativemem.spark;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.lang.management.ManagementFactory;
import java.lang.management.ThreadInfo;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.spark.SparkConf;
import org.apache.spark.memory.MemoryConsumer;
import org.apache.spark.memory.MemoryMode;
import org.apache.spark.memory.TaskMemoryManager;
import org.apache.spark.memory.UnifiedMemoryManager;
import org.junit.After;
import org.junit.Test;
import org.nativemem.ExecutorArbiter;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.NativeReservation;

/**
 * Executor-wide arbitration against Spark's real memory managers ({@code UnifiedMemoryManager}
 * and one {@code TaskMemoryManager} per task, as an executor has them): a task short of Spark
 * memory makes another task hand its idle native memory back while a thread of that other task
 * waits inside Spark, holding its {@code TaskMemoryManager}'s monitor.
 *
 * <p>That is the case a listener releasing under the task's monitor deadlocks on: Spark makes a
 * task under 1/2N of the pool wait for memory inside {@code acquireExecutionMemory}, which holds
 * the task's monitor, and only a release to the pool wakes it; the short task's arbitration wants
 * to release exactly that task's idle memory. {@link SparkReservationListener#unreserve} takes no
 * task monitor, so the release goes through, wakes the waiting consumer (Spark's fairness gives
 * it the memory), and both threads finish.
 */
public class SparkArbitrationTest {
    private static final long MIB = 1L << 20;

    @After
    public void arbitrationOff() {
        ExecutorArbiter.configure(false, false, 64 * MIB);
    }

    @Test
    public void arbitrationIsOnByDefaultAndCrossTaskSpillOff() {
        NativeMemorySparkConf.Arbitration a = NativeMemorySparkConf.defaults().arbitration();
        assertTrue(a.enabled());
        assertTrue(!a.crossTaskSpill());
        assertEquals(64 * MIB, a.spillCapBytes());
        java.util.Map<String, String> off = new java.util.HashMap<>();
        off.put("spark.nativemem.arbitration.enabled", "false");
        assertTrue(!NativeMemorySparkConf.parse(off).arbitration().enabled());
    }

    /** A JVM operator of a task: spills nothing (as Spark's own operators mid-build often can't). */
    static final class JvmConsumer extends MemoryConsumer {
        JvmConsumer(TaskMemoryManager tmm) {
            super(tmm, tmm.pageSizeBytes(), MemoryMode.OFF_HEAP);
        }

        @Override
        public long spill(long size, MemoryConsumer trigger) {
            return 0;
        }
    }

    @Test(timeout = 120_000)
    public void idleMemoryOfATaskWaitingInsideSparkIsHandedBackWithoutItsMonitor() throws Exception {
        SparkConf conf = new SparkConf(false).set("spark.memory.offHeap.enabled", "true")
                .set("spark.memory.offHeap.size", "64m");
        UnifiedMemoryManager spark = new UnifiedMemoryManager(conf, 256 * MIB, 128 * MIB, 2);
        TaskMemoryManager tmmA = new TaskMemoryManager(spark, 1);
        TaskMemoryManager tmmB = new TaskMemoryManager(spark, 2);
        ExecutorArbiter.configure(true, false, 64 * MIB);
        ExecutorArbiter.Status before = ExecutorArbiter.status();
        NativeMemoryConfig config = NativeMemoryConfig.defaults().withReservationBlockSize(8 * MIB)
                .withReservationQuantum(0);

        // Task A runs alone for a moment: its JVM operator takes 56 of the 64 MiB.
        JvmConsumer jvmA = new JvmConsumer(tmmA);
        assertEquals(56 * MIB, jvmA.acquireMemory(56 * MIB));
        // Task B's native work took one 8 MiB block from Spark and finished: 8 MiB idle cushion.
        SparkReservationListener listenerB = new SparkReservationListener(tmmB, MemoryMode.OFF_HEAP, "task B");
        NativeMemoryManager b = NativeMemoryManager.create("task B", listenerB, config);
        listenerB.attach(b);
        SparkReservationListener listenerA = new SparkReservationListener(tmmA, MemoryMode.OFF_HEAP, "task A");
        NativeMemoryManager a = NativeMemoryManager.create("task A", listenerA, config);
        listenerA.attach(a);
        try {
            try (NativeReservation r = b.newReservation("root", "op", MIB)) {
                assertEquals(8 * MIB, listenerB.heldBytes());
            }
            assertEquals("B's cushion is idle", 0, b.usedBytes());
            assertEquals(8 * MIB, b.reservedBytes());
            assertEquals("Spark counts B's cushion", 8 * MIB, tmmB.getMemoryConsumptionForThisTask());

            // A JVM operator of task B asks Spark for 1 MiB: B holds 8 MiB, under 1/2N = 16 MiB, and
            // the pool is empty, so Spark makes it wait, holding B's TaskMemoryManager monitor.
            JvmConsumer jvmB = new JvmConsumer(tmmB);
            AtomicLong jvmBGot = new AtomicLong(-1);
            AtomicReference<Throwable> failure = new AtomicReference<>();
            Thread waiter = new Thread(() -> {
                try {
                    jvmBGot.set(jvmB.acquireMemory(MIB));
                } catch (Throwable t) {
                    failure.set(t);
                }
            }, "task-B-jvm-operator");
            waiter.setDaemon(true);
            waiter.start();
            awaitWaitingInsideSpark(waiter);

            // Task A's native operator grows: A is over its 1/N, Spark grants nothing, A's JVM
            // operator cannot spill, so A arbitrates: B hands what A is short of (1 MiB) of its idle
            // cushion back to Spark from A's thread, while B's monitor is held by the waiting thread.
            CountDownLatch grown = new CountDownLatch(1);
            AtomicReference<Object> outcome = new AtomicReference<>();
            Thread grower = new Thread(() -> {
                try {
                    outcome.set(a.newReservation("root", "op", MIB));
                } catch (Throwable t) {
                    outcome.set(t);
                } finally {
                    grown.countDown();
                }
            }, "task-A-native-grow");
            grower.setDaemon(true);
            grower.start();
            if (!grown.await(30, TimeUnit.SECONDS)) {
                fail("task A's grow did not return in 30 s (deadlock?):\n" + stacks());
            }
            waiter.join(30_000);
            if (waiter.isAlive()) {
                fail("task B's JVM operator is still waiting inside Spark (A's grow: " + outcome.get()
                        + "; " + ExecutorArbiter.status() + "; B reserved " + b.reservedBytes() + "):\n" + stacks());
            }
            if (failure.get() != null) {
                throw new AssertionError("task B's JVM operator", failure.get());
            }

            ExecutorArbiter.Status after = ExecutorArbiter.status();
            assertEquals("one cross-task reclaim: " + after, before.reclaims() + 1, after.reclaims());
            assertEquals("of what A was short", before.reclaimedBytes() + MIB, after.reclaimedBytes());
            assertEquals("B's manager holds the rest from Spark", 7 * MIB, b.reservedBytes());
            assertEquals(7 * MIB, listenerB.heldBytes());
            assertEquals("what Spark reads", 7 * MIB, listenerB.getUsed());
            // Spark's fairness decides who gets the released memory: B is under 1/2N, A over 1/N.
            assertEquals("the waiting JVM operator of B got the released 1 MiB", MIB, jvmBGot.get());
            assertTrue("A's grow was refused (A is over its 1/N share): " + outcome.get(),
                    outcome.get() instanceof NativeOutOfMemoryException);
            assertEquals("A charged nothing", 0, a.usedBytes());
            assertEquals("A's own figures: one arbitration: " + a.stats(), 1, a.stats().arbitrations());
            assertEquals("A's own figures: the bytes B handed back", MIB, a.stats().arbitratedBytes());
            assertEquals("B asked nobody", 0, b.stats().arbitrations());
            assertEquals(a.reservedBytes(), listenerA.heldBytes());
            assertEquals("Spark's view of B", 8 * MIB, tmmB.getMemoryConsumptionForThisTask());
            assertEquals("Spark's view of A", 56 * MIB + listenerA.heldBytes(), tmmA.getMemoryConsumptionForThisTask());
            jvmB.freeMemory(MIB);
        } finally {
            a.close();
            b.close();
            jvmA.freeMemory(56 * MIB);
        }
        assertEquals("nothing left in Spark's pool", 0, spark.executionMemoryUsed());
    }

    /** Waits until {@code t} blocks in Spark's pool (a {@code wait()} inside acquireExecutionMemory). */
    private static void awaitWaitingInsideSpark(Thread t) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
        while (System.nanoTime() < deadline) {
            if (t.getState() == Thread.State.WAITING || t.getState() == Thread.State.TIMED_WAITING) {
                for (StackTraceElement e : t.getStackTrace()) {
                    if (e.getClassName().equals("org.apache.spark.memory.ExecutionMemoryPool")) {
                        return;
                    }
                }
            }
            Thread.sleep(5);
        }
        fail("task B's JVM operator never waited inside Spark:\n" + stacks());
    }

    private static String stacks() {
        StringBuilder sb = new StringBuilder();
        for (ThreadInfo info : ManagementFactory.getThreadMXBean().dumpAllThreads(true, true)) {
            if (info.getThreadName().startsWith("task-")) {
                sb.append(info);
            }
        }
        return sb.toString();
    }
}
