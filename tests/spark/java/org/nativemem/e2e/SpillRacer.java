package org.nativemem.e2e;

import java.util.ArrayList;
import java.util.List;
import java.util.Queue;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.spark.memory.TaskMemoryManager;
import org.nativemem.spark.SparkReservationListener;

/**
 * Executor side: a thread that asks a task's {@link SparkReservationListener} to spill, the way
 * Spark does from another thread of the task (holding the {@code TaskMemoryManager}'s monitor),
 * over and over while the task ends and its manager is closed, and for a while after. Every call
 * must return normally (0 once the manager is closing); failures are collected for the driver.
 */
final class SpillRacer {
    static final Queue<String> FAILURES = new ConcurrentLinkedQueue<>();
    static final AtomicLong CALLS = new AtomicLong();
    static final AtomicLong CALLS_AFTER_CLOSE = new AtomicLong();
    static final AtomicLong RELEASED = new AtomicLong();
    private static final List<Thread> THREADS = new ArrayList<>();

    private SpillRacer() {
    }

    static void start(SparkReservationListener listener, TaskMemoryManager tmm) {
        Thread t = new Thread(() -> race(listener, tmm), "e2e-spill-racer");
        t.setDaemon(true);
        synchronized (THREADS) {
            THREADS.add(t);
        }
        t.start();
    }

    private static void race(SparkReservationListener listener, TaskMemoryManager tmm) {
        long deadline = System.currentTimeMillis() + 20_000;
        long afterClose = 0;
        while (afterClose < 2_000 && System.currentTimeMillis() < deadline) {
            boolean closed = listener.manager().isClosed();
            try {
                long released;
                synchronized (tmm) { // as TaskMemoryManager.acquireExecutionMemory holds it
                    released = listener.spill(256 << 10, listener);
                }
                if (released < 0 || (closed && released != 0)) {
                    FAILURES.add("spill returned " + released + (closed ? " after close" : ""));
                }
                RELEASED.addAndGet(released);
            } catch (Throwable t) {
                FAILURES.add(E2e.fullMessage(t));
            }
            CALLS.incrementAndGet();
            if (closed) {
                afterClose++;
                CALLS_AFTER_CLOSE.incrementAndGet();
            }
        }
        if (afterClose < 2_000) {
            FAILURES.add("the manager was not closed within 20 s of the task");
        }
    }

    /** Waits for every racer of this JVM to finish. */
    static void awaitAll() throws InterruptedException {
        List<Thread> threads;
        synchronized (THREADS) {
            threads = new ArrayList<>(THREADS);
        }
        for (Thread t : threads) {
            t.join(30_000);
            if (t.isAlive()) {
                FAILURES.add("a spill racer did not finish");
            }
        }
    }
}
