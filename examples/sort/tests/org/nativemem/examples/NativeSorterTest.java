package org.nativemem.examples;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.io.IOException;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Iterator;
import java.util.List;
import java.util.NoSuchElementException;
import java.util.SplittableRandom;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;

import org.junit.After;
import org.junit.Before;
import org.junit.Test;
import org.nativemem.NativeLibraryLoader;
import org.nativemem.NativeMemoryConfig;
import org.nativemem.NativeMemoryException;
import org.nativemem.NativeMemoryManager;
import org.nativemem.NativeOutOfMemoryException;
import org.nativemem.ReservationListener;

/**
 * {@link NativeSorter} against the real native library: correctness, spills forced by a small
 * task limit and by the manager, the sorter's life tied to its manager's, and misuse. After each
 * test every manager is closed, no sorter handle is live and no byte is left reserved.
 */
public class NativeSorterTest {
    private static final long KIB = 1L << 10;
    private static final long MIB = 1L << 20;

    private final List<NativeMemoryManager> managers = new ArrayList<NativeMemoryManager>();
    private final List<Listener> listeners = new ArrayList<Listener>();
    private long liveBefore;
    private File dir;

    /** A listener with a capacity that counts what it granted. */
    static class Listener implements ReservationListener {
        final long capacity;
        final AtomicLong reserved = new AtomicLong();

        Listener(long capacity) {
            this.capacity = capacity;
        }

        void beforeReserve(long bytes) {
        }

        @Override
        public long reserve(long bytes) {
            beforeReserve(bytes);
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
            if (reserved.addAndGet(-bytes) < 0) {
                throw new AssertionError("unreserve(" + bytes + ") took back more than was granted");
            }
        }
    }

    @Before
    public void setUp() throws IOException {
        NativeLibraryLoader.load();
        liveBefore = NativeSorter.liveSorters();
        dir = Files.createTempDirectory("nativemem-sorter-test").toFile();
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
        assertEquals("live sorters after the test", liveBefore, NativeSorter.liveSorters());
        assertEquals("spill files left: " + Arrays.toString(dir.list()), 0, spillFiles());
        assertTrue(dir.delete());
    }

    private NativeMemoryManager manager(String name, Listener listener, NativeMemoryConfig config) {
        listeners.add(listener);
        NativeMemoryManager m = NativeMemoryManager.create(name, listener, config);
        managers.add(m);
        return m;
    }

    private NativeMemoryManager manager(String name) {
        return manager(name, new Listener(Long.MAX_VALUE), blocks());
    }

    /**
     * 1 MiB blocks and exact accounting (quantum 0, opt-in: the default is the 1 MiB quantum):
     * the tests pin the pools' used to what the sorter holds, to the byte.
     */
    private static NativeMemoryConfig blocks() {
        return NativeMemoryConfig.defaults().withReservationBlockSize(MIB).withReservationQuantum(0);
    }

    private int spillFiles() {
        String[] names = dir.list();
        return names == null ? 0 : names.length;
    }

    private static long[] randomKeys(int n, long seed) {
        SplittableRandom r = new SplittableRandom(seed);
        long[] keys = new long[n];
        for (int i = 0; i < n; i++) {
            keys[i] = r.nextLong();
        }
        return keys;
    }

    private static void insertInBatches(NativeSorter s, long[] keys, int batch) {
        for (int off = 0; off < keys.length; off += batch) {
            s.insert(keys, off, Math.min(batch, keys.length - off));
        }
    }

    /** Drains the iterator, checking that every batch but the last is full. */
    private static long[] drain(Iterator<long[]> it, int batchKeys) {
        List<long[]> batches = new ArrayList<long[]>();
        int total = 0;
        while (it.hasNext()) {
            long[] b = it.next();
            assertTrue("batches are never empty", b.length > 0);
            batches.add(b);
            total += b.length;
        }
        long[] all = new long[total];
        int at = 0;
        for (int i = 0; i < batches.size(); i++) {
            long[] b = batches.get(i);
            if (i < batches.size() - 1) {
                assertEquals("batch " + i + " is full", batchKeys, b.length);
            }
            System.arraycopy(b, 0, all, at, b.length);
            at += b.length;
        }
        return all;
    }

    private static long[] sortedCopy(long[] keys) {
        long[] c = keys.clone();
        Arrays.sort(c);
        return c;
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

    // ---- sorting --------------------------------------------------------------------------------

    @Test
    public void sortsInMemoryInFullBatches() {
        NativeMemoryManager m = manager("sort-in-memory");
        long[] keys = randomKeys(100_000, 1);
        keys[0] = Long.MIN_VALUE;
        keys[1] = Long.MAX_VALUE;
        keys[2] = 0;
        keys[3] = 0;
        SorterOptions options = SorterOptions.defaults().withBatchKeys(4096);
        try (NativeSorter s = new NativeSorter(m, "s", dir, options)) {
            insertInBatches(s, keys, 3000);
            SorterStats before = s.stats();
            assertEquals(100_000, before.rowsInserted());
            assertEquals(0, before.runs());
            assertTrue("the buffer is charged to the manager", m.usedBytes() >= 100_000 * 8);
            assertTrue(before.memoryBytes() >= 100_000 * 8);
            assertArrayEquals(sortedCopy(keys), drain(s.sorted(), 4096));
            SorterStats after = s.stats();
            assertEquals(100_000, after.rowsOutput());
            assertEquals(0, after.bytesSpilled());
            assertTrue(after.peakMemoryBytes() >= 100_000 * 8);
        }
        assertEquals("closing the sorter frees its memory", 0, m.usedBytes());
    }

    @Test
    public void emptyInputYieldsNoBatch() {
        NativeMemoryManager m = manager("empty");
        try (NativeSorter s = new NativeSorter(m, "s", dir)) {
            s.insert(new long[0]);
            Iterator<long[]> it = s.sorted();
            assertFalse(it.hasNext());
            expect(NoSuchElementException.class, "no more keys", it::next);
            assertEquals(0, s.nextBatch(new long[10]));
            assertEquals(0, s.stats().rowsInserted());
        }
    }

    @Test
    public void forcedSpillsUnderASmallTaskLimitStillSortEveryKey() {
        // 4 MiB for the task: 2 million keys (16 MB) spill several runs.
        Listener listener = new Listener(Long.MAX_VALUE);
        NativeMemoryManager m = manager("small-limit", listener, blocks().withTaskLimit(4 * MIB));
        long[] keys = randomKeys(2_000_000, 2);
        try (NativeSorter s = new NativeSorter(m, "s", dir)) {
            insertInBatches(s, keys, 50_000);
            SorterStats st = s.stats();
            assertTrue("spilled: " + st, st.runs() >= 3);
            assertEquals(st.rowsSpilled() * 8, st.bytesSpilled());
            assertTrue(st.spillTimeNanos() > 0);
            assertTrue("peak within the task limit: " + st, st.peakMemoryBytes() <= 4 * MIB);
            assertTrue("peak of the manager within the limit", m.peakBytes() <= 4 * MIB);
            assertEquals("one file per run", st.runs(), spillFiles());
            // The output read through the zero-copy cursor, with an odd buffer size.
            long[] out = new long[keys.length];
            long[] buf = new long[10_007];
            int at = 0;
            int n;
            while ((n = s.nextBatch(buf)) > 0) {
                System.arraycopy(buf, 0, out, at, n);
                at += n;
                if (n < buf.length) {
                    assertEquals("a short batch only at the end", 0, s.nextBatch(buf));
                    break;
                }
            }
            assertEquals(keys.length, at);
            assertArrayEquals(sortedCopy(keys), out);
            assertEquals("run files deleted as the merge finished them", 0, spillFiles());
        }
        assertEquals(0, m.usedBytes());
    }

    @Test
    public void aPoolLimitSpillsAndTheManagerCanSpillTheSorter() {
        NativeMemoryManager m = manager("pool-limit");
        long[] keys = randomKeys(600_000, 3); // 4.6 MiB
        SorterOptions options = SorterOptions.defaults().withPoolPath("op/sort").withPoolLimit(2 * MIB)
                .withChunkBytes(256 * KIB);
        try (NativeSorter s = new NativeSorter(m, "s", dir, options)) {
            insertInBatches(s, Arrays.copyOf(keys, 300_000), 100_000);
            long runs = s.stats().runs();
            assertTrue("the pool limit made it spill", runs >= 1);
            assertTrue(m.usageReport(), m.usageReport().contains("sort"));
            // Spark's direction: the manager asks its spillers for memory.
            long freed = m.spill(1);
            assertTrue("the sorter's buffer was spilled on request: " + freed, freed > 0);
            assertEquals(runs + 1, s.stats().runs());
            s.insert(keys, 300_000, 300_000);
            assertArrayEquals(sortedCopy(keys), drain(s.sorted(), SorterOptions.DEFAULT_BATCH_KEYS));
        }
    }

    @Test
    public void aMaxBufferCapSpillsWhateverThePoolAllows() {
        NativeMemoryManager m = manager("cap");
        long[] keys = randomKeys(400_000, 4);
        SorterOptions options = SorterOptions.defaults().withMaxBufferBytes(MIB);
        try (NativeSorter s = new NativeSorter(m, "s", dir, options)) {
            s.insert(keys);
            assertTrue(s.stats().runs() >= 2);
            assertArrayEquals(sortedCopy(keys), drain(s.sorted(), SorterOptions.DEFAULT_BATCH_KEYS));
        }
    }

    @Test
    public void notEvenOneChunkIsANativeOutOfMemoryError() {
        NativeMemoryManager m = manager("oom", new Listener(0), blocks());
        try (NativeSorter s = new NativeSorter(m, "s", dir)) {
            NativeOutOfMemoryException e = expect(NativeOutOfMemoryException.class, "sort", () -> s.insert(new long[] {1}));
            assertTrue(e.getMessage(), e.getMessage().contains("Native memory of 'oom'"));
            assertEquals(0, m.usedBytes());
        }
    }

    /**
     * The listener's exception reaches the sorter's library only as text: the engine ABI carries
     * a code ({@code NM_ERR_LISTENER}) and a message, not the throwable, so it is in the message
     * of the {@link NativeMemoryException}, not its cause.
     */
    @Test
    public void aListenerThatThrowsSurfacesWithItsMessage() {
        final RuntimeException boom = new RuntimeException("spark said no");
        Listener throwing = new Listener(Long.MAX_VALUE) {
            @Override
            void beforeReserve(long bytes) {
                throw boom;
            }
        };
        NativeMemoryManager m = manager("throws", throwing, blocks());
        try (NativeSorter s = new NativeSorter(m, "s", dir)) {
            NativeMemoryException e = expect(NativeMemoryException.class, "spark said no",
                    () -> s.insert(new long[] {1, 2}));
            assertTrue(e.getMessage(), e.getMessage().contains(boom.toString()));
            assertEquals(null, e.getCause());
        }
    }

    // ---- lifetime -----------------------------------------------------------------------------------

    @Test
    public void closingTheManagerClosesItsSorterFirst() {
        Listener listener = new Listener(Long.MAX_VALUE);
        NativeMemoryManager m = manager("owner", listener, blocks().withTaskLimit(2 * MIB));
        NativeSorter s = new NativeSorter(m, "s", dir);
        s.insert(randomKeys(1_000_000, 5));
        assertTrue("spill files exist", spillFiles() > 0);
        assertTrue(m.usedBytes() > 0);
        assertEquals(liveBefore + 1, NativeSorter.liveSorters());
        m.close();
        assertEquals("the sorter's memory was released before the manager's leak check",
                "'owner' closed with no leaks", m.closeReport().text());
        assertEquals(0, listener.reserved.get());
        assertEquals(liveBefore, NativeSorter.liveSorters());
        assertEquals("its spill files are deleted", 0, spillFiles());
        assertTrue(s.isClosed());
        for (Runnable call : Arrays.<Runnable>asList(() -> s.insert(new long[] {1}), s::sorted,
                () -> s.nextBatch(new long[1]), s::stats)) {
            expect(IllegalStateException.class, "its NativeMemoryManager 'owner' was closed", call);
        }
        s.close(); // a no-op
        s.close();
    }

    @Test
    public void closingTheManagerDuringTheOutputEndsIt() {
        NativeMemoryManager m = manager("mid-output", new Listener(Long.MAX_VALUE), blocks().withTaskLimit(2 * MIB));
        NativeSorter s = new NativeSorter(m, "s", dir);
        s.insert(randomKeys(500_000, 6));
        Iterator<long[]> it = s.sorted();
        assertTrue(it.hasNext());
        assertNotNull(it.next());
        m.close();
        assertEquals("'mid-output' closed with no leaks", m.closeReport().text());
        expect(IllegalStateException.class, "was closed", it::hasNext);
        assertEquals(0, spillFiles());
        // The native side refuses the handle too: it was removed with the manager.
        expect(IllegalStateException.class, "is stale", () -> NativeSorter.nativeStats(s.nativeHandle()));
    }

    @Test
    public void closeIsIdempotentAndLaterCallsThrow() {
        NativeMemoryManager m = manager("idem");
        NativeSorter s = new NativeSorter(m, "s", dir);
        s.insert(new long[] {3, 1, 2});
        s.close();
        s.close();
        assertTrue(s.isClosed());
        assertFalse(m.isClosed());
        assertEquals(0, m.usedBytes());
        expect(IllegalStateException.class, "NativeSorter 's' is closed", () -> s.insert(new long[] {1}));
        expect(IllegalStateException.class, "NativeSorter 's' is closed", s::stats);
        expect(IllegalStateException.class, "NativeSorter 's' is closed", s::sorted);
        expect(IllegalStateException.class, "is stale", () -> NativeSorter.nativeStats(s.nativeHandle()));
        expect(IllegalStateException.class, "is stale", () -> NativeSorter.nativeClose(s.nativeHandle()));
    }

    @Test
    public void aCallWhileAnotherThreadsCallRunsIsRefusedAndCloseLetsItFinish() throws Exception {
        final CountDownLatch inReserve = new CountDownLatch(1);
        final CountDownLatch release = new CountDownLatch(1);
        Listener blocking = new Listener(Long.MAX_VALUE) {
            @Override
            void beforeReserve(long bytes) {
                inReserve.countDown();
                try {
                    release.await(10, TimeUnit.SECONDS);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            }
        };
        NativeMemoryManager m = manager("busy", blocking, blocks());
        final NativeSorter s = new NativeSorter(m, "s", dir);
        final AtomicReference<Throwable> failure = new AtomicReference<Throwable>();
        Thread inserter = new Thread(() -> {
            try {
                s.insert(new long[] {5, 4, 3});
            } catch (Throwable t) {
                failure.set(t);
            }
        });
        inserter.start();
        assertTrue(inReserve.await(10, TimeUnit.SECONDS));
        expect(IllegalStateException.class, "in use by another call", () -> s.insert(new long[] {1}));
        assertEquals("stats as of the last finished call", 0, s.stats().rowsInserted());
        s.close(); // does not wait for the insert
        release.countDown();
        inserter.join(10_000);
        assertFalse(inserter.isAlive());
        assertEquals(null, failure.get());
        assertEquals("the insert freed the sorter when it returned", 0, m.usedBytes());
    }

    // ---- misuse -------------------------------------------------------------------------------------

    @Test
    public void misuseThrowsTheDocumentedExceptions() {
        final NativeMemoryManager m = manager("misuse");
        expect(NullPointerException.class, "manager", () -> new NativeSorter(null, "s", dir));
        expect(NullPointerException.class, "name", () -> new NativeSorter(m, null, dir));
        expect(NullPointerException.class, "spillDir", () -> new NativeSorter(m, "s", null));
        expect(NullPointerException.class, "options", () -> new NativeSorter(m, "s", dir, null));
        expect(IllegalArgumentException.class, "must be at least chunk_bytes",
                () -> new NativeSorter(m, "s", dir, SorterOptions.defaults().withMaxBufferBytes(1024)));
        expect(IllegalArgumentException.class, "positive multiple of 8", () -> SorterOptions.defaults().withChunkBytes(12));
        expect(IllegalArgumentException.class, "batch size", () -> SorterOptions.defaults().withBatchKeys(0));
        expect(IllegalArgumentException.class, "pool limit", () -> SorterOptions.defaults().withPoolLimit(-1));
        expect(IllegalArgumentException.class, "pool path", () -> SorterOptions.defaults().withPoolPath("a//b"));
        expect(NativeMemoryException.class, "create spill directory",
                () -> new NativeSorter(m, "s", new File("/proc/nativemem-cannot-create")));
        // The pool exists with no limit: asking for it with a limit is refused.
        m.newReservation("shared", 0).close();
        expect(IllegalArgumentException.class, "shared",
                () -> new NativeSorter(m, "s", dir, SorterOptions.defaults().withPoolPath("shared").withPoolLimit(MIB)));

        try (final NativeSorter s = new NativeSorter(m, "s", dir)) {
            expect(NullPointerException.class, "batch", () -> s.insert(null));
            expect(IndexOutOfBoundsException.class, "out of bounds", () -> s.insert(new long[3], 2, 2));
            expect(IndexOutOfBoundsException.class, "out of bounds", () -> s.insert(new long[3], -1, 1));
            expect(NullPointerException.class, "out", () -> s.nextBatch(null));
            // The native side checks on its own.
            long h = s.nativeHandle();
            expect(NullPointerException.class, "keys must not be null", () -> NativeSorter.nativeInsert(h, null, 0, 0));
            expect(IllegalArgumentException.class, "out of bounds for an array of length 3",
                    () -> NativeSorter.nativeInsert(h, new long[3], 1, 3));
            expect(IllegalArgumentException.class, "chunkBytes must be >= 0",
                    () -> NativeSorter.nativeCreate(NativeMemoryManager.nativeApi(), m.handle(), "x", dir.getPath(), "sort",
                            -1, -8, 10, -1, 8, 8));
            s.insert(new long[] {2, 1}, 0, 2);
            Iterator<long[]> it = s.sorted();
            expect(IllegalStateException.class, "already called", s::sorted);
            expect(IllegalStateException.class, "its input is finished", () -> s.insert(new long[] {3}));
            assertArrayEquals(new long[] {1, 2}, it.next());
            assertFalse(it.hasNext());
        }
    }

    @Test
    public void badHandlesAreIllegalStateNeverACrash() {
        NativeMemoryManager m = manager("handles");
        long managerHandle = m.handle();
        long sorterTag = 64; // the sorter table's kind tag: the first of the engines' range
        long[] forged = {0L, -1L, 1L, managerHandle, (sorterTag << 56) | (1L << 24) | 0xff_fff0L,
            (sorterTag << 56) | (0x7fff_ffffL << 24)};
        String[] messages = {"null sorter handle", "is not a sorter handle", "is not a sorter handle",
            "is not a sorter handle", "is unknown", "is unknown"};
        for (int i = 0; i < forged.length; i++) {
            final long h = forged[i];
            expect(IllegalStateException.class, messages[i], () -> NativeSorter.nativeStats(h));
            expect(IllegalStateException.class, messages[i], () -> NativeSorter.nativeInsert(h, new long[1], 0, 1));
            expect(IllegalStateException.class, messages[i], () -> NativeSorter.nativeNextBatch(h, new long[1]));
            expect(IllegalStateException.class, messages[i], () -> NativeSorter.nativeFinish(h));
            expect(IllegalStateException.class, messages[i], () -> NativeSorter.nativeClose(h));
        }
        // A sorter handle where a manager handle is expected, and a closed manager's handle.
        try (NativeSorter s = new NativeSorter(m, "s", dir)) {
            final long sh = s.nativeHandle();
            expect(IllegalStateException.class, "is not a memory manager handle",
                    () -> NativeSorter.nativeCreate(NativeMemoryManager.nativeApi(), sh, "x", dir.getPath(), "sort",
                            -1, 8, 8, -1, 8, 8));
        }
        NativeMemoryManager gone = manager("gone");
        final long stale = gone.handle();
        gone.close();
        expect(IllegalStateException.class, "is stale",
                () -> NativeSorter.nativeCreate(NativeMemoryManager.nativeApi(), stale, "x", dir.getPath(), "sort",
                        -1, 8, 8, -1, 8, 8));
        expect(IllegalStateException.class, "NativeMemoryManager 'gone'", () -> new NativeSorter(gone, "s", dir));
        // The library still works.
        try (NativeSorter s = new NativeSorter(m, "after", dir)) {
            s.insert(new long[] {9, 8});
            assertArrayEquals(new long[] {8, 9}, s.sorted().next());
        }
    }
}
