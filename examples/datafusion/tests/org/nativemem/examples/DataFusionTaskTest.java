package org.nativemem.examples;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicLong;

import org.junit.After;
import org.junit.Before;
import org.junit.Test;
import org.nativemem.NativeLibraryLoader;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryManager;
import org.nativemem.ReservationListener;

/**
 * {@link DataFusionTask} against the real libraries (nativemem's test library and
 * {@code libnativemem_df_engine} from the examples' resources), without Spark: the same results
 * unbounded and under a task limit that makes DataFusion spill, the manager asking DataFusion for
 * memory while a query runs (it yields and spills), the per-call mode on a counting consumer, an
 * impossible limit, and misuse. After each test every manager is closed with no leak and no byte
 * is left reserved from a listener.
 */
public class DataFusionTaskTest {
    private static final long MIB = 1L << 20;
    /** 3 million BIGINTs: 24 MB of data, more than the 24 MiB limit with DataFusion's overhead. */
    private static final long ROWS = 3_000_000;

    private final List<NativeMemoryManager> managers = new ArrayList<NativeMemoryManager>();
    private final List<Listener> listeners = new ArrayList<Listener>();

    /** A listener with a capacity that counts what it granted. */
    static final class Listener implements ReservationListener {
        final long capacity;
        final AtomicLong reserved = new AtomicLong();
        final AtomicLong unreserveCalls = new AtomicLong();

        Listener(long capacity) {
            this.capacity = capacity;
        }

        @Override
        public long reserve(long bytes) {
            while (true) {
                long cur = reserved.get();
                long grant = Math.min(bytes, capacity - cur);
                if (reserved.compareAndSet(cur, cur + grant)) {
                    return grant;
                }
            }
        }

        @Override
        public void unreserve(long bytes) {
            unreserveCalls.incrementAndGet();
            if (reserved.addAndGet(-bytes) < 0) {
                throw new AssertionError("unreserve(" + bytes + ") took back more than was granted");
            }
        }
    }

    /**
     * What the per-call pool calls through JNI (by name and signature, as on Spark's
     * {@code MemoryConsumer}): grants up to a capacity, counts calls and the balance.
     */
    public static final class PerCallConsumer {
        final long capacity;
        long used;
        long calls;
        long shortGrants;
        long overFreed;

        PerCallConsumer(long capacity) {
            this.capacity = capacity;
        }

        public synchronized long acquireMemory(long size) {
            calls++;
            long grant = Math.max(0, Math.min(size, capacity - used));
            if (grant < size) {
                shortGrants++;
            }
            used += grant;
            return grant;
        }

        /** Frees up to what was acquired (DataFusion's infallible grows may hold more than granted). */
        public synchronized void freeMemory(long size) {
            calls++;
            if (size > used) {
                overFreed += size - used;
                used = 0;
            } else {
                used -= size;
            }
        }

        synchronized long used() {
            return used;
        }

        synchronized long calls() {
            return calls;
        }
    }

    @Before
    public void setUp() {
        NativeLibraryLoader.load();
    }

    @After
    public void tearDown() {
        for (NativeMemoryManager m : managers) {
            m.close();
            assertEquals("close report of " + m.name(), "'" + m.name() + "' closed with no leaks", m.closeReport().text());
        }
        for (Listener l : listeners) {
            assertEquals("bytes still reserved from the listener", 0, l.reserved.get());
        }
    }

    private NativeMemoryManager manager(String name, NativeMemoryConfig config) {
        Listener listener = new Listener(Long.MAX_VALUE);
        listeners.add(listener);
        NativeMemoryManager m = NativeMemoryManager.create(name, listener, config);
        managers.add(m);
        return m;
    }

    private static NativeMemoryConfig blocks() {
        return NativeMemoryConfig.defaults().withReservationBlockSize(MIB);
    }

    /** Runs {@code query} on a fresh task of {@code m} and closes it: nothing stays used. */
    private static DataFusionStats run(NativeMemoryManager m, DataFusionTask.Query query, long rows) {
        DataFusionStats s;
        try (DataFusionTask df = DataFusionTask.open(m)) {
            df.start(query, rows);
            s = df.await();
            assertTrue("finished: " + s, s.finished());
            assertEquals("stats() after await agrees", s.digest(), df.stats().digest());
        }
        assertEquals("closing the task frees DataFusion's memory", 0, m.usedBytes());
        return s;
    }

    private static <T extends Throwable> T expect(Class<T> type, String fragment, Runnable call) {
        try {
            call.run();
        } catch (Throwable t) {
            if (t.getClass() != type) {
                AssertionError e = new AssertionError("expected " + type.getName() + " but got " + t);
                e.initCause(t);
                throw e;
            }
            assertTrue("<" + t.getMessage() + "> should contain <" + fragment + ">",
                    String.valueOf(t.getMessage()).contains(fragment));
            return type.cast(t);
        }
        fail("expected " + type.getName() + " but nothing was thrown");
        return null;
    }

    // ---- results, unbounded and spilled -----------------------------------------------------------

    private void sameResultUnboundedAndUnderALimit(DataFusionTask.Query query, long expectedRows) {
        DataFusionStats free = run(manager(query + "-free", blocks()), query, ROWS);
        // Exact accounting under the small limit: DataFusion runs many consumers, and with a quantum
        // each may hold up to two quanta of slack, which its fair-share policy counts against them
        // (seen failing 1 run in 3 at 24 MiB; DataFusion's fairness under nativemem is its own topic).
        NativeMemoryManager limited = manager(query + "-limited",
                blocks().withTaskLimit(24 * MIB).withReservationQuantum(0));
        DataFusionStats spilled = run(limited, query, ROWS);
        assertEquals("rows: " + free, expectedRows, free.rows());
        assertEquals("rows under the limit", free.rows(), spilled.rows());
        assertEquals("digest under the limit: " + spilled + " vs " + free, free.digest(), spilled.digest());
        assertEquals("no spill without a limit: " + free, 0, free.dfSpillCount());
        assertTrue("DataFusion spilled under 24 MiB: " + spilled, spilled.dfSpillCount() > 0);
        assertTrue("spilled bytes: " + spilled, spilled.dfSpilledBytes() > 0);
        assertTrue("peak within the limit: " + spilled, spilled.peakReservedBytes() <= 24 * MIB);
        assertTrue("DataFusion's memory was charged: " + spilled, spilled.peakReservedBytes() > 0);
        assertTrue("the manager's peak covers DataFusion's", limited.peakBytes() > 0);
        assertTrue("manager peak within the limit", limited.peakBytes() <= 24 * MIB);
        assertEquals("nativemem mode makes no per-call JNI call", 0, spilled.perCallCalls());
        assertTrue("elapsed", spilled.elapsedNanos() > 0);
    }

    @Test(timeout = 60_000)
    public void orderBySpillsUnderATaskLimitWithTheSameResult() {
        sameResultUnboundedAndUnderALimit(DataFusionTask.Query.ORDER_BY, ROWS);
    }

    @Test(timeout = 60_000)
    public void groupBySpillsUnderATaskLimitWithTheSameResult() {
        sameResultUnboundedAndUnderALimit(DataFusionTask.Query.GROUP_BY, ROWS / 3);
    }

    @Test(timeout = 60_000)
    public void eachOperatorsPeakIsReportedAfterTheQuery() {
        NativeMemoryManager m = manager("operator-peaks", blocks());
        try (DataFusionTask df = DataFusionTask.open(m)) {
            df.start(DataFusionTask.Query.ORDER_BY, ROWS);
            DataFusionStats s = df.await();
            java.util.Map<String, Long> peaks = df.operatorPeaks();
            assertTrue("the sort is among the operators: " + peaks,
                    peaks.keySet().stream().anyMatch(k -> k.startsWith("ExternalSorter")));
            long previous = Long.MAX_VALUE;
            for (java.util.Map.Entry<String, Long> e : peaks.entrySet()) {
                assertTrue("largest first: " + peaks, e.getValue() <= previous);
                assertTrue("within the query's peak " + s.peakReservedBytes() + ": " + e,
                        e.getValue() <= s.peakReservedBytes());
                previous = e.getValue();
            }
            assertTrue("an operator held memory: " + peaks, previous < Long.MAX_VALUE
                    && peaks.values().iterator().next() > 0);
        }
    }

    // ---- the manager asks DataFusion for memory -----------------------------------------------------

    @Test(timeout = 60_000)
    public void whenTheManagerAsksDataFusionYieldsAndSpills() throws InterruptedException {
        long rows = 4_000_000;
        DataFusionStats free = run(manager("asked-free", blocks()), DataFusionTask.Query.ORDER_BY, rows);
        NativeMemoryManager m = manager("asked", blocks());
        Listener listener = listeners.get(listeners.size() - 1);
        long reclaimed = 0;
        int asks = 0;
        DataFusionStats s;
        try (DataFusionTask df = DataFusionTask.open(m)) {
            assertTrue(df.answersSpillRequests());
            df.start(DataFusionTask.Query.ORDER_BY, rows);
            // As Spark's MemoryConsumer.spill does: while the query runs, the owner wants memory back.
            // (Until the query is over: finished, or nothing used for a while after it held memory.)
            long deadline = System.nanoTime() + 30_000_000_000L;
            boolean held = false;
            int idle = 0;
            while (!df.stats().finished() && idle < 20 && System.nanoTime() < deadline) {
                if (m.usedBytes() >= 4 * MIB) {
                    held = true;
                    idle = 0;
                    reclaimed += m.reclaim(4 * MIB);
                    asks++;
                } else if (held && m.usedBytes() == 0) {
                    idle++;
                }
                Thread.sleep(5);
            }
            s = df.await();
        }
        assertTrue("the manager asked at least once while the query ran", asks > 0);
        assertEquals("same rows", free.rows(), s.rows());
        assertEquals("same digest: " + s + " vs " + free, free.digest(), s.digest());
        assertTrue("the pool was asked: " + s, s.spillRequests() > 0 && s.requestedBytes() > 0);
        assertTrue("consumers yielded: " + s, s.yields() > 0 && s.yieldedBytes() > 0);
        assertTrue("DataFusion spilled because it was asked: " + s, s.dfSpillCount() > 0);
        assertEquals(0, m.usedBytes());
        assertTrue("reclaim returned the cushion at once (" + reclaimed + " B) or the listener got bytes back later",
                reclaimed > 0 || listener.unreserveCalls.get() > 0);
    }

    // ---- the per-call mode (Comet's design) ----------------------------------------------------------

    @Test(timeout = 60_000)
    public void perCallModeCallsTheConsumerOnEveryGrowAndChargesNoPool() {
        DataFusionStats free = run(manager("per-call-free", blocks()), DataFusionTask.Query.ORDER_BY, ROWS);
        NativeMemoryManager m = manager("per-call", blocks());
        PerCallConsumer unlimited = new PerCallConsumer(Long.MAX_VALUE);
        PerCallConsumer small = new PerCallConsumer(24 * MIB);
        DataFusionStats a;
        DataFusionStats b;
        DataFusionQueryException smallFailed = null;
        try (DataFusionTask df = DataFusionTask.open(m, "datafusion", 2, false, unlimited)) {
            assertEquals(unlimited, df.perCallConsumer());
            df.start(DataFusionTask.Query.ORDER_BY, ROWS);
            a = df.await();
            assertEquals("nativemem is not charged in the per-call mode", 0, m.peakBytes());
        }
        // 24 MiB that nativemem's pool sorts in (orderBySpillsUnderATaskLimitWithTheSameResult): a
        // per-call pool has no fairness and no room kept for unspillable consumers (the sort's merge
        // reservation), so a short grant may fail the query instead of making it spill.
        try (DataFusionTask df = DataFusionTask.open(m, "datafusion", 2, false, small)) {
            df.start(DataFusionTask.Query.ORDER_BY, ROWS);
            try {
                b = df.await();
            } catch (DataFusionQueryException e) {
                smallFailed = e;
                b = df.stats();
            }
        }
        assertEquals("digest, unlimited consumer", free.digest(), a.digest());
        assertEquals("all acquired memory was freed", 0, unlimited.used());
        assertEquals("all acquired memory was freed, even after a failure", 0, small.used());
        assertTrue("JNI calls counted: " + a, a.perCallCalls() > 0);
        assertEquals("the engine counts the calls the consumer saw", unlimited.calls(), a.perCallCalls());
        assertEquals("the engine counts the calls the consumer saw", small.calls(), b.perCallCalls());
        assertTrue("the 24 MiB consumer granted short", small.shortGrants > 0);
        if (smallFailed != null) {
            assertTrue("a refusal: " + smallFailed.getMessage(), smallFailed.resourcesExhausted());
        } else {
            assertEquals("digest, 24 MiB consumer", free.digest(), b.digest());
            assertTrue("short grants make DataFusion spill: " + b, b.dfSpillCount() > 0);
        }
        assertEquals("nothing asked of a per-call pool", 0, b.spillRequests());
        assertEquals(0, m.peakBytes());
    }

    // ---- failures ----------------------------------------------------------------------------------

    @Test(timeout = 60_000)
    public void anImpossibleLimitFailsTheQueryWithTheUsageReport() {
        NativeMemoryManager m = manager("impossible", blocks().withTaskLimit(MIB));
        try (DataFusionTask df = DataFusionTask.open(m)) {
            df.start(DataFusionTask.Query.ORDER_BY, ROWS);
            DataFusionQueryException e = expect(DataFusionQueryException.class, "Native memory of", df::await);
            assertTrue("resources exhausted: " + e.getMessage(), e.resourcesExhausted());
            assertTrue(e.getMessage(), e.getMessage().contains("'impossible'"));
            assertTrue(e.getMessage(), e.getMessage().contains("datafusion"));
            // The task stays usable: stats, and the same query fails the same way again.
            DataFusionStats afterFailure = df.stats();
            df.start(DataFusionTask.Query.ORDER_BY, ROWS);
            assertTrue(expect(DataFusionQueryException.class, "Native memory of", df::await).resourcesExhausted());
            assertEquals("a failed query released its memory", 0, m.usedBytes());
            assertFalse("a failed query is not finished: " + afterFailure, afterFailure.finished());
        }
        assertEquals("a failed query released its memory", 0, m.usedBytes());
    }

    // ---- misuse ------------------------------------------------------------------------------------

    @Test(timeout = 60_000)
    public void startWhileRunningAwaitWithoutStartAndClosedHandles() {
        // A limit, so that a close that failed to cancel would cost spill files, not 500 MB of memory.
        NativeMemoryManager m = manager("misuse", blocks().withTaskLimit(64 * MIB));
        final DataFusionTask df = DataFusionTask.open(m);
        expect(IllegalStateException.class, "", df::await);
        df.start(DataFusionTask.Query.ORDER_BY, 20_000_000);
        expect(IllegalStateException.class, "", () -> df.start(DataFusionTask.Query.GROUP_BY, 10));
        assertFalse("running", df.stats().finished());
        // Close cancels the running query and waits for it: well before 20 million rows are sorted.
        long t0 = System.nanoTime();
        df.close();
        assertTrue("close cancelled the query promptly", System.nanoTime() - t0 < 10_000_000_000L);
        assertTrue(df.isClosed());
        df.close(); // idempotent
        assertEquals("closing released everything", 0, m.usedBytes());
        expect(IllegalStateException.class, "closed", df::stats);
        expect(IllegalStateException.class, "closed", df::await);
        expect(IllegalStateException.class, "closed", () -> df.start(DataFusionTask.Query.ORDER_BY, 10));
        // The native handle itself is stale now.
        final long h = df.nativeHandle();
        expect(IllegalStateException.class, "", () -> DataFusionTask.nativeStats(h));
        expect(IllegalStateException.class, "", () -> DataFusionTask.nativeStart(h, 0, 10));
        expect(IllegalStateException.class, "", () -> DataFusionTask.nativeAwait(h));
        expect(IllegalStateException.class, "", () -> DataFusionTask.nativeClose(h));
        expect(IllegalStateException.class, "", () -> DataFusionTask.nativeStats(0));
    }

    @Test
    public void invalidArguments() {
        final NativeMemoryManager m = manager("arguments", blocks());
        expect(NullPointerException.class, "manager", () -> DataFusionTask.open(null));
        expect(NullPointerException.class, "poolPath", () -> DataFusionTask.open(m, null, 2, true, null));
        expect(IllegalArgumentException.class, "partitions", () -> DataFusionTask.open(m, "datafusion", 0, true, null));
        expect(IllegalArgumentException.class, "partitions", () -> DataFusionTask.open(m, "datafusion", 65, true, null));
        expect(IllegalArgumentException.class, "acquireMemory",
                () -> DataFusionTask.open(m, "datafusion", 2, false, new Object()));
        expect(IllegalArgumentException.class, "answerSpillRequests",
                () -> DataFusionTask.open(m, "datafusion", 2, true, new PerCallConsumer(MIB)));
        final DataFusionTask df = DataFusionTask.open(m, "df/q1", 1, true, null);
        try {
            assertEquals("df/q1", df.poolPath());
            assertEquals(1, df.partitions());
            assertNotNull(df.toString());
            expect(NullPointerException.class, "query", () -> df.start(null, 10));
            expect(IllegalArgumentException.class, "rows", () -> df.start(DataFusionTask.Query.ORDER_BY, 0));
            expect(IllegalArgumentException.class, "rows", () -> df.start(DataFusionTask.Query.GROUP_BY, -1));
        } finally {
            df.close();
        }
        NativeMemoryManager closed = NativeMemoryManager.create("closed", new Listener(Long.MAX_VALUE), blocks());
        closed.close();
        expect(IllegalStateException.class, "", () -> DataFusionTask.open(closed));
    }
}
